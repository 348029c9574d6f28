"""Which message trace queries answer a batch of (Message-ID, recipient, time) in the fewest requests.

Pure decisions, no I/O. Graph's ``$filter`` on messageTraces takes one value per property combined
with ``and`` (no ``or``, no ``in``), and a time period of at most 10 days that starts at most 90 days
back and ends no later than now (https://learn.microsoft.com/graph/api/messagetracingroot-list-messagetraces).
So a batch is cut into time windows of at most 10 days, and each window is asked either

- message by message (``messageId eq``), when it holds only a few messages: one small page each, or
- all at once (only the time bounds, narrowed by ``senderAddress eq`` or ``recipientAddress eq`` when
  the whole window shares one), paged with up to 5,000 records a page and matched locally.

The cost is the number of requests (the quota is 100 per 5 minutes per tenant); a page of 5,000 is
as cheap as a page of one, so a windowed query is chosen as soon as it saves requests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from relay365.tracing.model import TraceRequest, message_id_literal

DAY = 86400.0
MAX_INTERVAL = 10 * DAY - 120  # "The time interval must not exceed 10 days" (a margin for skew)
MAX_AGE = 90 * DAY - 3600  # "{startDateTime} must not be more than 90 days before the current date"
LEAD = 300.0  # Microsoft's receivedDateTime may precede relay365's own record of the 250 a little
LAG = 1800.0  # ... and follow it (queueing inside Exchange, clock skew)
SKEW = 60.0  # "{endDateTime} must not be later than the current date": end a minute before our now
PER_MESSAGE_LIMIT = 3  # up to this many messages in a window: one messageId query each


def odata_time(epoch: float) -> str:
    """``YYYY-MM-DDThh:mm:ssZ``, the form the API reference asks for (whole seconds, UTC)."""
    return datetime.fromtimestamp(math.floor(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def odata_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True, slots=True)
class TraceQuery:
    """One ``$filter`` for the messageTraces list."""

    start: float
    end: float
    message_id: str | None = None
    sender: str | None = None
    recipient: str | None = None

    def filter(self) -> str:
        clauses = [
            f"receivedDateTime ge {odata_time(self.start)}",
            f"receivedDateTime le {odata_time(self.end)}",
        ]
        if self.message_id is not None:
            clauses.append(f"messageId eq {odata_string(message_id_literal(self.message_id))}")
        if self.sender is not None:
            clauses.append(f"senderAddress eq {odata_string(self.sender)}")
        if self.recipient is not None:
            clauses.append(f"recipientAddress eq {odata_string(self.recipient)}")
        return " and ".join(clauses)


@dataclass(frozen=True, slots=True)
class Plan:
    queries: tuple[TraceQuery, ...]
    expired: tuple[TraceRequest, ...]  # older than the trace keeps: never asked


def _windows(requests: list[TraceRequest]) -> list[list[TraceRequest]]:
    groups: list[list[TraceRequest]] = []
    for request in sorted(requests, key=lambda r: r.sent_at):
        group = groups[-1] if groups else None
        if group is not None and request.sent_at + LAG - (group[0].sent_at - LEAD) <= MAX_INTERVAL:
            group.append(request)
        else:
            groups.append([request])
    return groups


def _common(values: Sequence[str | None]) -> str | None:
    found = {v.strip().lower() for v in values if v}
    if len(found) == 1 and all(values):
        return found.pop()
    return None


def plan(requests: Sequence[TraceRequest], *, now: float, per_message_limit: int = PER_MESSAGE_LIMIT) -> Plan:
    """The queries that find ``requests`` as of ``now`` (a period ends a minute before it, in case the
    service's clock is behind ours: mail of the last minute is found by the next lookup).
    ``per_message_limit=0``: windows only (for messages without a Message-ID, matched otherwise)."""
    oldest = now - MAX_AGE
    live = [r for r in requests if r.sent_at + LAG >= oldest]
    expired = tuple(r for r in requests if r.sent_at + LAG < oldest)
    queries: list[TraceQuery] = []
    latest = now - SKEW
    for group in _windows(live):
        end = min(max(r.sent_at for r in group) + LAG, latest)
        start = min(max(group[0].sent_at - LEAD, oldest), end)
        ids = list(dict.fromkeys(r.key[0] for r in group))
        if len(ids) <= per_message_limit:
            for wanted in ids:
                original = next(r.message_id for r in group if r.key[0] == wanted)
                queries.append(TraceQuery(start, end, message_id=original))
            continue
        sender = _common([r.sender for r in group])
        recipient = None if sender else _common([r.recipient for r in group])
        queries.append(TraceQuery(start, end, sender=sender, recipient=recipient))
    return Plan(tuple(queries), expired)
