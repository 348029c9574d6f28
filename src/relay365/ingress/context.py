"""What every session of every listener shares, and the orderly end of those sessions on shutdown.

On SIGTERM (RFC 5321 3.8: a server that must close says ``421`` first) every open session is told
``421 4.3.2 Service shutting down``: an idle one at once; one that is busy (in DATA, or answering a
command) when its reply is out, so a message being received is finished, fsynced and acknowledged
first. Sessions still open when the grace period ends get the 421 then and are closed; a message they
were sending was never acknowledged, so the device sends it again later and nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from relay365.ingress import policy
from relay365.ingress.handshake import HandshakeLog
from relay365.ingress.identity import AuthGuard, ConnectionLimiter, DeviceDirectory
from relay365.observability.metrics import Metrics
from relay365.spool.model import Spool

log = logging.getLogger(__name__)
CLOSE_WAIT = 5.0  # after the 421, how long closing connections get to go away


class Session(Protocol):
    def begin_shutdown(self) -> None:
        """Say 421 now if idle, else after the reply in progress."""

    def goodbye(self) -> None:
        """Say 421 now and close, whatever the session is doing."""


def no_route_check(sender: str, rcpt: str, device: str) -> str | None:
    return None


@dataclass
class IngressContext:
    """Built once by the composition root. ``route_reply(sender, rcpt, device)`` answers whether mail
    from the null sender has a route that can carry it (the reply to refuse the recipient with, or
    None)."""

    spool: Spool
    devices: DeviceDirectory
    limiter: ConnectionLimiter
    guard: AuthGuard
    rates: policy.RateLimiter
    hostname: str
    on_queued: Callable[[str], None] = lambda queue_id: None
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    metrics: Metrics = field(default_factory=Metrics)
    route_reply: Callable[[str, str, str], str | None] = no_route_check
    tls_failures: HandshakeLog = field(default_factory=HandshakeLog)
    sessions: set[Session] = field(default_factory=set)
    closing: bool = False
    all_closed: asyncio.Event = field(default_factory=asyncio.Event)

    def forget(self, session: Session) -> None:
        """A session's connection is gone."""
        self.sessions.discard(session)
        if not self.sessions:
            self.all_closed.set()


async def _until_closed(ctx: IngressContext, seconds: float) -> None:
    if ctx.sessions:
        ctx.all_closed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.all_closed.wait(), seconds)


async def shutdown(ctx: IngressContext, *, grace: float) -> None:
    """Tell every open session 421 4.3.2, letting a message in progress finish within ``grace``."""
    ctx.closing = True
    if not ctx.sessions:
        return
    log.info("shutting down: %d device session(s) open, %.0fs to finish", len(ctx.sessions), grace)
    for session in list(ctx.sessions):
        session.begin_shutdown()
    await _until_closed(ctx, grace)
    if ctx.sessions:
        log.warning("closing %d device session(s) still open after %.0fs", len(ctx.sessions), grace)
        for session in list(ctx.sessions):
            session.goodbye()
        await _until_closed(ctx, CLOSE_WAIT)
