"""What the spool stores and the contract every spool (SQLite, PostgreSQL) implements.

A queue entry is a message (envelope + the spooled RFC 5322 bytes) and one row per recipient with its
own state: Postfix's queue states mapped to recipients (queued = incoming/active, deferred, delivered,
bounced) plus a message-level hold.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counts for monitoring: recipients per state, messages on hold, oldest open message."""

    recipients: dict[str, int]
    held: int
    oldest: float | None  # received_at of the oldest message with queued/deferred recipients


@dataclass(frozen=True, slots=True)
class PaceEvent:
    """One message sent as an upstream mailbox/app (for pacing windows that survive a restart)."""

    key: str
    at: float
    recipients: int


class RcptState(enum.StrEnum):
    QUEUED = "queued"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"


FINAL_STATES = frozenset({RcptState.DELIVERED, RcptState.BOUNCED})


class QueueState(enum.StrEnum):
    """What ``relay365 queue list --state`` selects: a message with a recipient in that state, or
    (``held``) a message on hold."""

    QUEUED = "queued"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    HELD = "held"


@dataclass(frozen=True, slots=True)
class QueueFilter:
    """Which messages ``Spool.query`` selects; every condition given must hold. ``sender`` and
    ``recipient`` are an address, ``@domain`` or a pattern with ``*`` (case-insensitive); ``<>``
    is the null sender. ``state`` and ``recipient`` apply to the same recipient."""

    state: QueueState | None = None
    device: str | None = None
    sender: str | None = None
    recipient: str | None = None

    def is_empty(self) -> bool:
        return self == QueueFilter()


def new_queue_id() -> str:
    """Sortable by arrival (milliseconds) and unique (24 random bits): e.g. ``0193A4F2C81D7B3E9A1``."""
    return f"{time.time_ns() // 1_000_000:011X}{secrets.token_hex(4).upper()}"


@dataclass(frozen=True, slots=True)
class Envelope:
    mail_from: str  # "" is the null sender <>
    rcpt_tos: tuple[str, ...]
    device: str = ""
    peer: str = ""
    listener: str = ""
    smtputf8: bool = False
    is_dsn: bool = False


@dataclass(frozen=True, slots=True)
class Recipient:
    rcpt: str
    state: RcptState
    attempts: int
    next_attempt: float
    last_reply: str


@dataclass(frozen=True, slots=True)
class QueueEntry:
    queue_id: str
    envelope: Envelope
    size: int
    received_at: float
    held: bool
    body_path: Path
    recipients: tuple[Recipient, ...]


@dataclass(frozen=True, slots=True)
class QueuePage:
    """The first entries that match a filter (oldest first) and how many match in all."""

    entries: list[QueueEntry]
    total: int


def entry_dict(e: QueueEntry) -> dict[str, Any]:
    """A queue entry as JSON-ready data (``relay365 queue list --json`` and ``/api/queue``)."""
    return {
        "queue_id": e.queue_id,
        "from": e.envelope.mail_from,
        "device": e.envelope.device,
        "size": e.size,
        "received_at": e.received_at,
        "held": e.held,
        "recipients": [
            {
                "rcpt": r.rcpt,
                "state": r.state.value,
                "attempts": r.attempts,
                "next_attempt": r.next_attempt,
                "last_reply": r.last_reply,
            }
            for r in e.recipients
        ],
    }


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    """The outcome of one delivery attempt for one recipient."""

    rcpt: str
    state: RcptState
    reply: str
    next_attempt: float = 0.0
    counts_attempt: bool = True  # False when pacing (not a failure) postponed the recipient


@dataclass(frozen=True, slots=True)
class Bounce:
    """A DSN to queue in the same transaction as the updates that caused it."""

    body: bytes
    envelope: Envelope


class IncomingMessage(Protocol):
    """A message being received: bytes are streamed in, then committed (fsync) or aborted."""

    queue_id: str
    size: int

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None:
        """Called after each ``write``: the message may move buffered bytes to storage here."""

    async def commit(self, envelope: Envelope) -> str: ...

    async def abort(self) -> None: ...


class Spool(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def incoming(self) -> IncomingMessage:
        """A new message; raises ``SpoolFullError`` when free space is below the reserve."""
        ...

    def check_room(self, size: int = 0) -> None:
        """Raise ``SpoolFullError`` if storing ``size`` more bytes would cut into the free-space
        reserve kept for the queue's own bookkeeping (delivery outcomes, DSNs)."""
        ...

    async def stats(self) -> QueueStats: ...

    async def enqueue(self, envelope: Envelope, body: bytes) -> str: ...

    async def due(self, now: float, *, limit: int, exclude: frozenset[str]) -> list[QueueEntry]: ...

    async def record(
        self,
        queue_id: str,
        updates: Sequence[RecipientUpdate],
        *,
        bounce: Bounce | None = None,
        pace_events: Sequence[PaceEvent] = (),
    ) -> None: ...

    async def pace_events(self, since: float) -> list[PaceEvent]: ...

    async def next_due_time(self) -> float | None: ...

    async def get(self, queue_id: str) -> QueueEntry: ...

    async def query(self, where: QueueFilter, *, limit: int | None) -> QueuePage:
        """The oldest ``limit`` (None: all) entries matching ``where``, and how many match."""
        ...

    async def retry_matching(self, where: QueueFilter, now: float) -> int:
        """Make every open recipient of the matching messages due at ``now``; return how many
        messages matched."""
        ...

    async def hold(self, queue_id: str, held: bool) -> None: ...

    async def retry(self, queue_id: str, now: float) -> None: ...

    def flush_requested(self) -> float: ...

    async def delete(self, queue_id: str) -> None: ...
