"""The sandbox's message trace: one record per accepted message and recipient, with its events.

Fields and values follow Graph's ``exchangeMessageTrace`` and ``exchangeMessageTraceDetail``
(https://learn.microsoft.com/graph/api/resources/exchangemessagetrace,
https://learn.microsoft.com/graph/api/resources/exchangemessagetracedetail):

- ``id``: the message trace id, one per message (Get-MessageTraceV2's MessageTraceId); a message to
  three recipients has three records with the same id, told apart by ``recipientAddress``;
- ``senderAddress`` (the envelope sender; for Graph sendMail the From: address), ``recipientAddress``,
  ``messageId`` (the Message-ID header field, angle brackets included), ``receivedDateTime`` (UTC),
  ``subject``, ``size`` (bytes), ``fromIP`` (for incoming mail the public IP of the sending server, as
  Microsoft sees it; empty for Graph, which has no SMTP client), ``toIP`` (empty: "for incoming
  messages to Exchange Online, this value is blank"; the sandbox resolves no MX for outgoing mail);
- ``status``: ``gettingStatus``, ``pending``, ``failed``, ``delivered``, ``expanded``,
  ``quarantined``, ``filteredAsSpam`` (Graph's exchangeMessageTraceStatus; the sandbox never
  produces ``recalled``, which Graph only sends with ``Prefer: include-unknown-enum-members``).

A record's status is the status set by its last event whose time has come (sandbox clock), and
``gettingStatus`` until ``ready_at`` (``trace_status_delay_seconds`` after receipt): Get-MessageTraceV2
describes GettingStatus as "the message is waiting for status update". Throttled submissions are
``pending`` until their deferred delivery. A recipient a mail flow rule redirected is ``expanded``
(sandbox choice: Graph has no status for it; the old message trace said "None: ... redirected to a
different recipient"), with a ``Redirect`` event naming the new recipient, who has a record of its own.

Event names follow Get-MessageTraceDetailV2 and the Graph example (``Receive``, ``Deliver``,
``Fail``, ``Defer``, ``Expand``...); the descriptions are the sandbox's wording. Records are kept in
memory and appended to ``<state>/trace/records.jsonl`` (one JSON object a line; a torn last line is
ignored when read back), so a restarted sandbox still knows its trace.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

GETTING_STATUS = "gettingStatus"
PENDING = "pending"
FAILED = "failed"
DELIVERED = "delivered"
EXPANDED = "expanded"
QUARANTINED = "quarantined"
FILTERED_AS_SPAM = "filteredAsSpam"
STATUSES = (GETTING_STATUS, PENDING, FAILED, DELIVERED, EXPANDED, QUARANTINED, FILTERED_AS_SPAM)

_RECORDS_FILE = "records.jsonl"


def graph_time(epoch: float) -> str:
    """``2026-01-21T14:12:34Z``: the UTC timestamp form of Graph's message trace examples."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class TraceEvent:
    """One ``exchangeMessageTraceDetail``; ``status`` is the record status it sets (None: unchanged)."""

    at: float
    event: str
    description: str
    action: str = ""
    data: str = ""
    status: str | None = None


@dataclass(frozen=True)
class TraceRecord:
    """One ``exchangeMessageTrace`` row: a message as one recipient saw it."""

    trace_id: str
    message_id: str
    sender: str
    recipient: str
    received_at: float
    subject: str
    size: int
    from_ip: str
    to_ip: str
    ready_at: float
    events: tuple[TraceEvent, ...]
    stored_id: str = ""  # the sandbox's copy for this recipient (not part of Graph's resource)

    def visible_events(self, now: float) -> list[TraceEvent]:
        """The events an observer at ``now`` sees (only the receipt before ``ready_at``)."""
        if now < self.ready_at:
            return [e for e in self.events[:1] if e.at <= now]
        return [e for e in self.events if e.at <= now]

    def status_at(self, now: float) -> str:
        status = GETTING_STATUS
        for event in self.visible_events(now):
            if event.status is not None:
                status = event.status
        return status

    def to_graph(self, now: float) -> dict[str, Any]:
        """The ``exchangeMessageTrace`` JSON object."""
        return {
            "id": self.trace_id,
            "senderAddress": self.sender,
            "recipientAddress": self.recipient,
            "messageId": self.message_id,
            "receivedDateTime": graph_time(self.received_at),
            "subject": self.subject,
            "size": self.size,
            "fromIP": self.from_ip,
            "toIP": self.to_ip,
            "status": self.status_at(now),
        }

    def details_to_graph(self, now: float) -> list[dict[str, Any]]:
        """The ``exchangeMessageTraceDetail`` JSON objects (getDetailsByRecipient)."""
        return [
            {
                "id": self.trace_id,
                "messageId": self.message_id,
                "dateTime": graph_time(e.at),
                "event": e.event,
                "action": e.action,
                "description": e.description,
                "data": e.data,
            }
            for e in self.visible_events(now)
        ]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["events"] = [asdict(e) for e in self.events]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TraceRecord:
        events = tuple(TraceEvent(**e) for e in data.pop("events"))
        return cls(**data, events=events)


class TraceLog:
    """Thread-safe trace records, newest first on query, persisted under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], TraceRecord] = {}
        self._load()

    def _load(self) -> None:
        path = self.root / _RECORDS_FILE
        try:
            lines = path.read_bytes().splitlines()
        except FileNotFoundError:
            return
        for line in lines:
            try:
                record = TraceRecord.from_json(json.loads(line))
            except (ValueError, TypeError, KeyError):
                logger.warning("ignoring an unreadable line of %s", path)
                continue
            self._records[(record.trace_id, record.recipient.lower())] = record

    def add(self, records: Iterable[TraceRecord]) -> None:
        """Keep these records (a record with the same id and recipient is replaced)."""
        batch = list(records)
        if not batch:
            return
        lines = b"".join(json.dumps(r.to_json(), separators=(",", ":")).encode() + b"\n" for r in batch)
        with self._lock:
            with open(self.root / _RECORDS_FILE, "ab") as handle:
                handle.write(lines)
            for record in batch:
                self._records[(record.trace_id, record.recipient.lower())] = record

    def append_event(self, trace_id: str, recipient: str, event: TraceEvent) -> TraceRecord | None:
        """Add an event to one record (a quarantine release); None if there is no such record."""
        with self._lock:
            record = self._records.get((trace_id, recipient.lower()))
        if record is None:
            return None
        updated = replace(record, events=(*record.events, event))
        self.add([updated])
        return updated

    def records(self) -> list[TraceRecord]:
        """Every record, newest first (then by id and recipient, so pages are stable)."""
        with self._lock:
            found = list(self._records.values())
        found.sort(key=lambda r: (-r.received_at, r.trace_id, r.recipient.lower()))
        return found

    def for_stored(self, stored_id: str) -> TraceRecord | None:
        """The record whose recipient got the stored copy ``stored_id``."""
        with self._lock:
            return next((r for r in self._records.values() if r.stored_id and r.stored_id == stored_id), None)

    def for_message(self, trace_id: str) -> list[TraceRecord]:
        """The records of one message trace id (any case), one per recipient."""
        wanted = trace_id.lower()
        with self._lock:
            return [r for (tid, _), r in self._records.items() if tid.lower() == wanted]
