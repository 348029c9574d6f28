"""The transport contract.

A transport takes one queued message (an :class:`OutboundMessage`: queue id, envelope and the spooled
RFC 5322 bytes as a :class:`BodySource`, read through the spool, never by path) and returns one
:class:`RecipientResult` per recipient. It raises only the :class:`relay365.errors.DeliveryError`
family, for failures that concern the whole message (connection refused, TLS failure, 4xx/5xx to
MAIL FROM or DATA). The transient/permanent decision is made here, once, in the transport, and
nowhere else.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from relay365.settings import TransportSettings
from relay365.spool.model import BodySource


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """What a transport needs to send one message: never a live object of another stage."""

    queue_id: str
    mail_from: str  # "" for the null sender <>
    rcpt_tos: tuple[str, ...]
    body: BodySource  # read with ``await body.read_all()`` or ``async with body.open() as r``
    size: int
    smtputf8: bool = False

    async def read_body(self) -> bytes:
        """The spooled bytes. A body that cannot be read is the spool's fault, not the upstream's:
        ``SpoolIOError``, which the scheduler records as this attempt's failure."""
        return await self.body.read_all()


@dataclass(frozen=True, slots=True)
class RecipientResult:
    rcpt: str
    outcome: Outcome
    reply: str  # the upstream's reply as text, e.g. "250 2.0.0 OK" or "550 5.1.1 unknown"
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class PaceLimits:
    messages_per_window: int = 30
    window: float = 60.0
    recipients_per_day: int = 10_000
    day: float = 86_400.0
    concurrency: int = 3


@runtime_checkable
class Transport(Protocol):
    """One upstream option. ``name`` is the transport's configured name (used in logs and routes)."""

    name: str

    async def deliver(self, message: OutboundMessage) -> list[RecipientResult]:
        """Send ``message``; one result per recipient, or raise a ``DeliveryError``."""
        ...

    async def close(self) -> None:
        """Close pooled upstream sessions."""
        ...


@runtime_checkable
class PacedTransport(Transport, Protocol):
    """A transport that sends as one upstream mailbox or app, paced to that mailbox's limits."""

    pacing_key: str
    pacing: PaceLimits


@runtime_checkable
class SessionHolder(Protocol):
    """A transport that keeps idle upstream sessions open for the next message (SMTP). Where several
    relays share a mailbox's session limit (pacing through PostgreSQL), the scheduler has it close
    them after each message, so an idle session of one node never takes a slot another one needs
    (Exchange Online counts connections, not messages: 432 4.3.2 past three)."""

    async def release_idle(self) -> None:
        """Close the sessions not in use now (QUIT); never raises."""


RecipientRule = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class TransportKind:
    """What a transport module tells the rest of the relay about its type."""

    type: str
    factory: Callable[[TransportSettings, str], Transport]  # (settings, helo name) -> transport
    # RFC 5321 4.5.5: can mail from the null sender <> go through it as it is? (README, "The null sender")
    carries_null_sender: bool
    # The recipients this type can reach at all (Direct Send: the tenant's accepted domains); None: any.
    recipient_rule: Callable[[TransportSettings], RecipientRule | None] = lambda settings: None
