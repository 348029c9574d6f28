"""What the spool stores: the data types every spool backend and its users share.

A queue entry is a message (envelope + the spooled RFC 5322 bytes) and one row per recipient with its
own state: Postfix's queue states mapped to recipients (queued = incoming/active, deferred, delivered,
bounced) plus a message-level hold. The behaviour (what is durable when, claims and leases) is the
contract in ``spool/contract.py``.
"""

from __future__ import annotations

import enum
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from relay365.spool.wire import unstuff


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
    """What ``relay365 queue list --state`` (and the console) selects: a message with a recipient in
    that state, (``open``) one with a recipient still to deliver, or (``held``) a message on hold."""

    OPEN = "open"
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
    transport: str | None = None  # the transport of a recipient's last attempt
    min_age: float | None = None  # received at least this many seconds ago

    def is_empty(self) -> bool:
        return self == QueueFilter()


QueueOrder = Literal["oldest", "newest"]
PAGE_MAX = 500  # entries per page at most (the console and the API)


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueQuery:
    """One page of a filtered queue view (the console, ``/api/queue``): ``Spool.query``'s arguments."""

    where: QueueFilter = QueueFilter()
    order: QueueOrder = "newest"
    cursor: str | None = None  # the previous page's ``next_cursor``
    limit: int = 50


def new_queue_id() -> str:
    """Sortable by arrival (milliseconds) and unique (24 random bits): e.g. ``0193A4F2C81D7B3E9A1``."""
    return f"{time.time_ns() // 1_000_000:011X}{secrets.token_hex(4).upper()}"


def new_owner_id() -> str:
    """Who claims messages: unique per process incarnation (host, pid and 32 random bits, so a
    restarted process with a recycled pid is a new owner), e.g. ``relay1.4711.9f86d081``."""
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40]
    return f"{host or 'host'}.{os.getpid()}.{secrets.token_hex(4)}"


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
    """One message as the spool returned it. ``body_ref`` locates the body for the spool that
    returned the entry (opaque to everyone else: read the body with ``Spool.body(entry)``)."""

    queue_id: str
    envelope: Envelope
    size: int
    received_at: float
    held: bool
    recipients: tuple[Recipient, ...]
    body_ref: str = ""
    claimed_by: str = ""  # the owner delivering it now ("" when unclaimed), see Spool.claim
    claimed_until: float = 0.0
    # The body is in wire form (dot-stuffed, spool/wire.py); False only for entries spooled by an
    # earlier relay365, which holds the message itself.
    stuffed: bool = True


@dataclass(frozen=True, slots=True)
class QueuePage:
    """One page of the entries that match a filter, how many match in all (every page together),
    and the cursor of the next page (None: this is the last)."""

    entries: list[QueueEntry]
    total: int
    next_cursor: str | None = None


def entry_dict(e: QueueEntry) -> dict[str, Any]:
    """A queue entry as JSON-ready data, one shape for every tool: ``relay365 queue list|show --json``,
    and ``/api/queue`` and the console (``admin/views.entry_json`` adds each reply's explanation)."""
    return {
        "queue_id": e.queue_id,
        "from": e.envelope.mail_from,
        "subject": e.envelope.subject,
        "message_id": e.envelope.message_id,
        "device": e.envelope.device,
        "peer": e.envelope.peer,
        "listener": e.envelope.listener,
        "size": e.size,
        "received_at": e.received_at,
        "held": e.held,
        "recipients": [
            {
                "rcpt": r.rcpt,
                "state": r.state.value,
                "attempts": r.attempts,
                "next_attempt": r.next_attempt,
                "transport": r.transport,
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
    transport: str = ""  # which transport tried ("" leaves the stored one)


@dataclass(frozen=True, slots=True)
class Bounce:
    """A DSN to queue in the same transaction as the updates that caused it."""

    body: bytes  # in wire form (``spool/wire.stuff``), spooled as it is
    envelope: Envelope


class IncomingMessage(Protocol):
    """A message being received: bytes are streamed in, then committed or aborted (the contract
    is in spool/contract.py, next to ``Spool.incoming``). The bytes are the message in wire form
    (dot-stuffed, ``spool/wire.py``): stored and later read as they are."""

    queue_id: str
    size: int

    def write(self, data: bytes) -> None:
        """Append ``data`` (kept as given, no copy); no I/O on the caller's event loop."""

    async def drain(self) -> None:
        """Called after each ``write``: the message may move buffered bytes to storage here, so
        memory per message stays bounded. ``SpoolFullError`` when the bytes would cut into the
        free-space reserve (``check_room``), ``SpoolIOError`` on other failures."""

    async def commit(self, envelope: Envelope) -> str:
        """Make the message a queue entry and return its queue id. Durable when it returns: the
        body and the entry are on stable storage, so ingress may answer 250 (RFC 5321 6.1). It is
        atomic: after an error nothing is queued and the message is aborted (the device retries
        after a 4xx). Once started it finishes even if the caller is cancelled (shield it)."""
        ...

    async def abort(self) -> None:
        """Drop the message; never raises (a leftover is removed by ``recover``)."""


class BodyReader(Protocol):
    """An open message body (``Spool.body``): the spooled bytes as stored (wire form, unless the
    entry says otherwise: ``QueueEntry.stuffed``), read in chunks or at once."""

    size: int

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all the rest for -1); b"" at the end. Raises ``SpoolIOError``."""
        ...

    def chunks(self, n: int = 256 * 1024) -> AsyncIterator[bytes]:
        """The rest of the body in chunks of at most ``n`` bytes."""
        ...

    async def read_all(self) -> bytes:
        """The whole body (from the start)."""
        ...

    def fileno(self) -> int | None:
        """A file descriptor positioned at the start of the body, for ``sendfile``; None when the
        backend keeps no file (memory, PostgreSQL)."""
        ...


@dataclass(frozen=True, slots=True)
class BodySource:
    """A message body as a transport sees it: read through the spool, never a path.

    ``open()`` gives the spooled bytes as they lie: the wire form when ``stuffed`` (an SMTP transport
    sends them as they are, ``sendfile`` where the reader has a file); ``read_all`` and ``head`` give
    the message itself (RFC 5322 bytes, unstuffed: Graph, the headers of a DSN)."""

    queue_id: str
    size: int
    opener: Callable[[], AbstractAsyncContextManager[BodyReader]]
    stuffed: bool = True

    def open(self) -> AbstractAsyncContextManager[BodyReader]:
        return self.opener()

    async def read_all(self) -> bytes:
        """The whole message; ``SpoolIOError`` when the spool cannot read it."""
        async with self.opener() as reader:
            data = await reader.read_all()
        return unstuff(data) if self.stuffed else data

    async def head(self, n: int) -> bytes:
        """The first ``n`` bytes of the message, or a few less (fewer for a shorter body)."""
        async with self.opener() as reader:
            data = await reader.read(n)
        return unstuff(data) if self.stuffed else data
