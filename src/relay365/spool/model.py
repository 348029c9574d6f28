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
from typing import Protocol


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
    # Header facts read while DATA streamed (for the console and the tracking log), not envelope data.
    subject: str = ""
    message_id: str = ""


@dataclass(frozen=True, slots=True)
class Recipient:
    rcpt: str
    state: RcptState
    attempts: int
    next_attempt: float
    last_reply: str
    transport: str = ""  # the transport of the last attempt ("" before the first)


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
class RecipientUpdate:
    """The outcome of one delivery attempt for one recipient."""

    rcpt: str
    state: RcptState
    reply: str
    next_attempt: float = 0.0
    counts_attempt: bool = True  # False when pacing (not a failure) postponed the recipient
    transport: str = ""  # which transport tried ("" leaves the stored one)


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

    def incoming(self) -> IncomingMessage: ...

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

    async def list(self) -> list[QueueEntry]: ...

    async def hold(self, queue_id: str, held: bool) -> None: ...

    async def retry(self, queue_id: str, now: float) -> None: ...

    def flush_requested(self) -> float: ...

    async def delete(self, queue_id: str) -> None: ...
