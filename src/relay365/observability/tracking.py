"""The tracking log: what happened to every message, searchable like Exchange's message trace.

One :class:`TrackingEvent` per step of a message's life (received, routed, attempted, delivered,
deferred, bounced), per refusal at the SMTP door (``refused``: the device never got a queue id), per
admin action (held, released, retried, deleted, with the admin's name in ``actor``: the audit log), and
what Microsoft 365 did after it accepted the message (``m365_*``, written by relay365.tracing's
follower from Exchange Online's message trace).

The log is an observation, not the queue: losing the last events on power loss is acceptable, losing
mail is not. So writers never wait for it (``record`` only appends to a batch; a backend writes batches
off the event loop) and a failing tracking store never fails a delivery or an SMTP reply.

Backends implement :class:`TrackingLog`: SQLite now (``tracking_sqlite.py``, its own database file
beside the queue), PostgreSQL later; :class:`MemoryTrackingLog` is the test double and the fallback
when tracking is switched off.
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

DEFAULT_RETENTION_DAYS = 30  # Exchange Online's message trace reaches back 90 days; 30 is enough here
MAX_PAGE = 1000
FIELD_LIMIT = 998  # RFC 5322 2.1.1: no header line is longer; nothing stored is longer either


class EventKind(enum.StrEnum):
    RECEIVED = "received"  # queued, 250 sent to the device
    REFUSED = "refused"  # a 4xx/5xx sent to a device (no queue id): policy, auth, TLS, spool full
    ROUTED = "routed"  # the router chose a transport for a recipient
    ATTEMPTED = "attempted"  # a transport started on a recipient
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    HELD = "held"  # admin actions from here on: ``actor`` says who
    RELEASED = "released"
    RETRIED = "retried"
    DELETED = "deleted"
    ADMIN = "admin"  # any other console action (login, API token, doctor run)
    # Microsoft 365's side, after it accepted the message (relay365.tracing's follower): ``reply`` is
    # the message trace status (Delivered, FilteredAsSpam, Quarantined, Failed, ...), ``detail`` its
    # reason, ``peer`` the IP address Microsoft saw (fromIP): Graph's exchangeMessageTrace and
    # exchangeMessageTraceDetail (learn.microsoft.com/graph/api/resources/exchangemessagetrace).
    M365_STATUS = "m365_status"  # a recipient's status in Microsoft's message trace (when it changes)
    M365_EVENT = "m365_event"  # one event of it (Receive, Spam Diagnostics, Deliver...): ``reply`` = event
    M365_UNRESOLVED = "m365_unresolved"  # no final status within the horizon ([tracing] horizon)


ADMIN_KINDS = frozenset(
    {EventKind.HELD, EventKind.RELEASED, EventKind.RETRIED, EventKind.DELETED, EventKind.ADMIN}
)
M365_KINDS = frozenset({EventKind.M365_STATUS, EventKind.M365_EVENT, EventKind.M365_UNRESOLVED})


def _clip(text: str) -> str:
    return text if len(text) <= FIELD_LIMIT else text[: FIELD_LIMIT - 3] + "..."


@dataclass(frozen=True, slots=True, kw_only=True)
class TrackingEvent:
    kind: EventKind
    at: float
    queue_id: str = ""
    message_id: str = ""
    subject: str = ""
    sender: str = ""
    recipient: str = ""
    device: str = ""
    peer: str = ""
    listener: str = ""
    transport: str = ""
    reply: str = ""
    actor: str = ""  # the admin who acted (audit log)
    detail: str = ""  # route reason, TLS version, admin action text
    id: int = 0  # assigned by the store: increasing, the paging cursor

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def clipped(self) -> TrackingEvent:
        return replace(
            self,
            subject=_clip(self.subject),
            message_id=_clip(self.message_id),
            reply=_clip(self.reply),
            detail=_clip(self.detail),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceQuery:
    """Every condition given must hold. ``sender``/``recipient`` match an address, ``@domain`` or a
    ``*`` pattern, case-insensitively (RFC 5321 2.4); ``subject`` matches a substring; ``message_id``
    and ``queue_id`` exactly (angle brackets optional). ``before`` is the paging cursor: only events
    with a smaller id (newest first)."""

    sender: str | None = None
    recipient: str | None = None
    subject: str | None = None
    message_id: str | None = None
    queue_id: str | None = None
    device: str | None = None
    transport: str | None = None
    kinds: tuple[EventKind, ...] = ()
    since: float | None = None
    until: float | None = None
    before: int | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class TracePage:
    events: list[TrackingEvent]
    next_cursor: int | None  # pass as ``before`` for the next (older) page; None: no more


class TrackingLog(Protocol):
    """Write events without waiting; search them; forget those older than the retention."""

    def record(self, event: TrackingEvent) -> None:
        """Queue ``event`` for writing. Never blocks and never raises: a tracking failure is logged,
        and mail goes on."""
        ...

    async def flush(self) -> None:
        """Wait until every event recorded so far is searchable."""
        ...

    async def search(self, query: TraceQuery) -> TracePage: ...

    async def purge(self, before: float) -> int:
        """Delete events older than ``before``; return how many."""
        ...

    def last_id(self) -> int:
        """The id of the newest event written (live updates poll it cheaply)."""
        ...

    async def counts(self, since: float) -> dict[EventKind, int]:
        """How many events of each kind since ``since`` (the overview's last hour and day)."""
        ...


def normalize_message_id(value: str) -> str:
    v = value.strip()
    return v[1:-1] if v.startswith("<") and v.endswith(">") else v


def address_matches(pattern: str, address: str) -> bool:
    """The Python twin of the SQL match: ``@domain``, ``*`` wildcards, else the exact address."""
    p, a = pattern.strip().lower(), address.lower()
    if p.startswith("@"):
        p = "*" + p
    if "*" not in p:
        return p == a
    parts = p.split("*")
    if not a.startswith(parts[0]) or not a.endswith(parts[-1]):
        return False
    pos = len(parts[0])
    for middle in parts[1:-1]:
        found = a.find(middle, pos)
        if found < 0:
            return False
        pos = found + len(middle)
    return pos <= len(a) - len(parts[-1])


def matches(q: TraceQuery, e: TrackingEvent) -> bool:
    return (
        (q.sender is None or address_matches(q.sender, e.sender))
        and (q.recipient is None or address_matches(q.recipient, e.recipient))
        and (q.subject is None or q.subject.lower() in e.subject.lower())
        and (q.message_id is None or normalize_message_id(q.message_id) == e.message_id)
        and (q.queue_id is None or q.queue_id.strip().upper() == e.queue_id)
        and (q.device is None or q.device == e.device)
        and (q.transport is None or q.transport == e.transport)
        and (not q.kinds or e.kind in q.kinds)
        and (q.since is None or e.at >= q.since)
        and (q.until is None or e.at <= q.until)
        and (q.before is None or e.id < q.before)
    )


@dataclass
class MemoryTrackingLog:
    """Events in memory (bounded): the test double, and the log when tracking is switched off."""

    capacity: int = 10_000
    clock: Callable[[], float] = time.time
    _events: deque[TrackingEvent] = field(default_factory=deque)
    _ids: Iterable[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, event: TrackingEvent) -> None:
        with self._lock:
            self._events.append(replace(event.clipped(), id=next(iter(self._ids))))
            while len(self._events) > self.capacity:
                self._events.popleft()

    async def flush(self) -> None:
        return None

    async def search(self, query: TraceQuery) -> TracePage:
        with self._lock:
            found = [e for e in reversed(self._events) if matches(query, e)]
        page = found[: query.limit]
        more = len(found) > query.limit
        return TracePage(page, page[-1].id if more and page else None)

    async def purge(self, before: float) -> int:
        with self._lock:
            kept = deque(e for e in self._events if e.at >= before)
            removed = len(self._events) - len(kept)
            self._events = kept
        return removed

    def last_id(self) -> int:
        with self._lock:
            return self._events[-1].id if self._events else 0

    async def counts(self, since: float) -> dict[EventKind, int]:
        out = dict.fromkeys(EventKind, 0)
        with self._lock:
            for e in self._events:
                if e.at >= since:
                    out[e.kind] += 1
        return out


class Backlog:
    """Events recorded but not yet written, shared by the threads that record them and the one writer
    of a tracking log (SQLite, PostgreSQL). Bounded: past ``limit`` the oldest are dropped and counted,
    so a stuck disk or database never holds the relay's memory. ``scheduled``: a writer runs or is
    about to, so a burst of events starts one writer, not one per event."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._events: list[TrackingEvent] = []
        self._dropped = 0
        self._scheduled = False

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)

    def add(self, event: TrackingEvent) -> bool:
        """Queue ``event``; True when the caller must start a writer (none is scheduled)."""
        with self._lock:
            self._events.append(event)
            if len(self._events) > self._limit:
                del self._events[: len(self._events) - self._limit]
                self._dropped += 1
            if self._scheduled:
                return False
            self._scheduled = True
            return True

    def wake(self) -> bool:
        """For a flush: True when events wait (a writer is then scheduled)."""
        with self._lock:
            waiting = bool(self._events)
            self._scheduled = self._scheduled or waiting
            return waiting

    def unschedule(self) -> None:
        """The writer could not be started (the log is closed)."""
        with self._lock:
            self._scheduled = False

    def take(self) -> tuple[list[TrackingEvent], int] | None:
        """The writer's next batch and how many were dropped since the last; None when there is
        nothing left (the writer stops and the next event schedules a new one)."""
        with self._lock:
            batch, self._events = self._events, []
            dropped, self._dropped = self._dropped, 0
            if not batch:
                self._scheduled = False
                return None
            return batch, dropped

    def put_back(self, batch: list[TrackingEvent]) -> None:
        """A batch that could not be written goes first again."""
        with self._lock:
            self._events[:0] = batch
