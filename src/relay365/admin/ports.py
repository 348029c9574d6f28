"""What the console needs from the rest of relay365: small typed interfaces, never the relay itself.

The composition root builds one object per interface (today ``relay365.service.console`` from the
running relay); tests may build them from anything. The console reads:

* :class:`StatusSource`: listeners, connections, transports (held back, token, pacing headroom), metrics;
* :class:`QueueAdmin`: the queue, paged and filtered in the backend, and the actions on it;
* ``TrackingLog`` (``relay365.observability.tracking``): the message trace and the audit log;
* ``DeviceActivitySource`` (``relay365.observability.activity``): what each device did lately;
* :class:`SetupSource`: the doctor report and the SPF record (tools: only the adapter imports them);
* :class:`MailboxSource`: the sandbox's mailboxes, when the demo runs;
* ``explain``: a reply's meaning and fix from the reply-code catalogue;
* :class:`PostAcceptanceSource`: what the message trace follower knows of mail Microsoft 365 accepted
  (relay365.tracing), when ``[tracing]`` follows any transport.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from relay365.observability.activity import DeviceActivitySource
from relay365.observability.tracking import TrackingLog
from relay365.spool.model import QueueEntry, QueuePage, QueueQuery, QueueStats
from relay365.tracing.work import FollowItem, OutcomeCount


@dataclass(frozen=True, slots=True)
class TokenStatus:
    """An OAuth transport's token: when it expires, when it was last fetched, the last error."""

    expires_at: float | None
    last_refresh: float | None
    last_error: str  # e.g. "AADSTS7000215: Invalid client secret provided." ("" when none)


@dataclass(frozen=True, slots=True)
class Headroom:
    """How much a mailbox may still send now (Exchange Online's limits, exchange-online.md)."""

    key: str
    messages_left: int  # in the current pacing window (30 per minute for SMTP AUTH)
    window: float
    recipients_left: int  # in the rolling 24 hours (10,000)
    sessions_in_use: int
    sessions_max: int


@dataclass(frozen=True, slots=True)
class TransportStatus:
    name: str
    type: str
    state: str  # "ok", "held back" (unreachable), "failing" (last attempt did not deliver), "idle"
    held_until: float | None = None
    last_reply: str = ""
    token: TokenStatus | None = None
    pacing: Headroom | None = None


class StatusSource(Protocol):
    def now(self) -> float: ...

    def listeners(self) -> dict[str, int]:
        """Listener name -> bound port."""
        ...

    def connections(self) -> int: ...

    def delivery_stopped(self) -> str | None:
        """Why all delivery is stopped (the spool cannot record outcomes), or None."""
        ...

    async def transports(self) -> list[TransportStatus]: ...

    async def metrics(self) -> bytes:
        """The Prometheus exposition, refreshed (raises ``SpoolError`` if the spool cannot be read)."""
        ...


class QueueAdmin(Protocol):
    async def browse(self, query: QueueQuery) -> QueuePage: ...

    async def get(self, queue_id: str) -> QueueEntry:
        """Raises ``QueueEntryNotFound``."""
        ...

    async def head(self, queue_id: str) -> bytes:
        """The start of the spooled message (its header section)."""
        ...

    def raw(self, queue_id: str) -> AsyncIterator[bytes]:
        """The spooled message as stored, in chunks (raises ``QueueEntryNotFound``)."""
        ...

    async def hold(self, queue_id: str, held: bool) -> None: ...

    async def retry(self, queue_id: str) -> None: ...

    async def delete(self, queue_id: str) -> None: ...

    async def stats(self) -> QueueStats: ...


@dataclass(frozen=True, slots=True)
class CheckRow:
    name: str
    status: str  # pass, warn, fail
    detail: str
    fix: str = ""


@dataclass(frozen=True, slots=True)
class SpfAdvice:
    domain: str
    record: str
    note: str = ""


class SetupSource(Protocol):
    async def doctor(self) -> list[CheckRow]: ...

    def spf(self) -> list[SpfAdvice]: ...


@dataclass(frozen=True, slots=True)
class MailboxMessage:
    id: str
    mailbox: str
    folder: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    received_at: float
    size: int
    subject: str
    headers: tuple[tuple[str, str], ...] = ()


class MailboxSource(Protocol):
    def mailboxes(self) -> list[str]: ...

    def messages(self, mailbox: str | None, folder: str | None) -> list[MailboxMessage]: ...

    def message(self, message_id: str) -> MailboxMessage:
        """Raises ``LookupError``."""
        ...

    def content(self, message_id: str) -> bytes: ...

    def version(self) -> float:
        """Changes whenever a message is stored (live updates poll it)."""
        ...


class PostAcceptanceSource(Protocol):
    """The follower's rows (``relay365.tracing.work.FollowStore`` answers both)."""

    async def outcomes(self, since: float) -> list[OutcomeCount]:
        """Recipients handed over since ``since``, counted per route, transport and trace status."""
        ...

    async def for_message(self, queue_id: str) -> list[FollowItem]:
        """The followed recipients of one message (waiting for Microsoft's trace, or settled)."""
        ...


def no_explanation(reply: str) -> str | None:
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsoleDeps:
    status: StatusSource
    queue: QueueAdmin
    tracking: TrackingLog
    devices: DeviceActivitySource
    setup: SetupSource | None = None
    mailboxes: MailboxSource | None = None
    explain: Callable[[str], str | None] = field(default=no_explanation)
    post_acceptance: PostAcceptanceSource | None = None
