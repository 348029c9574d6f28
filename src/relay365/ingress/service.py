"""The ingress service: every device listener and the sessions it carries, as one async context manager.

::

    async with IngressService(settings=..., spool=..., on_queued=delivery.wake, ...) as ingress:
        ingress.ports           # listener name -> bound port (port 0 in the config: the kernel's)
        ingress.connections()   # open device connections
    # on the way out: no new connections; 421 4.3.2 to every open session, a message in DATA
    # finishing first within ``grace`` (``context.shutdown``); then the background work ends

Starting binds the listeners in config order, each with its TLS context (the configured certificate, or
a self-signed one under ``spool_dir/tls``) and, for implicit TLS, the relay's own handshake acceptor
(``handshake.ImplicitTLSAcceptor``). If one cannot be bound (an address in use, not on this host), those
already bound are closed again and the error propagates: nothing is left listening.

A reload (``prepare_reload``, then ``apply`` or the change's ``rollback``) binds and closes listeners as
``listeners.py`` describes and, at ``apply``, puts the new device table, connection caps, AUTH limits
and host name in place. A session keeps its listener's settings to its end and follows the new device
table from its next MAIL (``RelaySMTP._identify_again``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Protocol, Self

from relay365.ingress.context import IngressContext, shutdown
from relay365.ingress.handshake import HandshakeLog
from relay365.ingress.identity import AuthGuard, ConnectionLimiter, DeviceDirectory
from relay365.ingress.listeners import Endpoint, ListenerChange, Listeners
from relay365.ingress.policy import RateLimiter
from relay365.ingress.shared import SharedGuard, SharedLimiter, SharedRates, SharedState
from relay365.ingress.tls import self_signed_chains, server_context
from relay365.observability.activity import DeviceActivity
from relay365.observability.metrics import Metrics
from relay365.observability.tracking import TrackingLog
from relay365.settings import ListenerSettings, Settings
from relay365.spool.contract import Spool

log = logging.getLogger(__name__)


class IngressStatus(Protocol):
    """What the rest of the relay may read of a running ingress (the console, the metrics)."""

    @property
    def ports(self) -> Mapping[str, int]:
        """Listener name -> bound port."""
        ...

    def connections(self) -> int:
        """Open device connections."""
        ...

    def refresh_metrics(self) -> None:
        """Set ingress's gauges (open connections) before a scrape."""
        ...


class IngressService:
    def __init__(
        self,
        *,
        settings: Settings,
        spool: Spool,
        metrics: Metrics,
        tracking: TrackingLog,
        activity: DeviceActivity,
        on_queued: Callable[[str], None] = lambda queue_id: None,
        route_reply: Callable[[str, str, str], str | None] = lambda sender, rcpt, device: None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        shared: SharedState | None = None,
        sockets: Mapping[str, socket.socket] | None = None,
    ) -> None:
        """An ingress worker process (service/worker.py) passes ``shared``, its way to the supervisor's
        connection caps, AUTH counters and rates (ingress/shared.py), and ``sockets``, the listening
        sockets it inherited (listener name -> socket), which it serves instead of binding its own.

        ``on_queued(queue_id)``: a message was committed (delivery's wake-up); ``route_reply(sender,
        rcpt, device)``: the reply refusing a null-sender recipient no route can carry, or None.
        ``clock``: wall time (TLS failure log windows); ``monotonic``: AUTH guard and rate limits."""
        s = settings
        self._settings = settings
        self._sockets = dict(sockets or {})
        self.context = IngressContext(
            spool=spool,
            devices=DeviceDirectory(s.devices),
            limiter=(
                SharedLimiter(shared)
                if shared
                else ConnectionLimiter(total=s.server.max_connections, per_ip=s.server.max_connections_per_ip)
            ),
            guard=SharedGuard(shared, s.server) if shared else AuthGuard(s.server, clock=monotonic),
            rates=SharedRates(shared) if shared else RateLimiter(clock=monotonic),
            hostname=s.server.hostname,
            on_queued=on_queued,
            metrics=metrics,
            tls_failures=HandshakeLog(clock=clock),
            route_reply=route_reply,
            tracking=tracking,
            activity=activity,
        )
        # how long open sessions get to finish at shutdown (``Relay.stop(grace=)`` may change it)
        self.grace = s.server.shutdown_grace
        self._listeners = Listeners(self.context)

    # -- lifecycle -------------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        try:
            await self._listeners.open([self._endpoint(x) for x in self._settings.listeners])
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    def _endpoint(self, listener: ListenerSettings, settings: Settings | None = None) -> Endpoint:
        tls = self._tls(listener, settings or self._settings)
        return Endpoint(listener, tls, self._sockets.get(listener.name))

    @staticmethod
    def _tls(listener: ListenerSettings, settings: Settings) -> ssl.SSLContext | None:
        if listener.tls == "none":
            return None
        if listener.cert_file and listener.key_file:
            chains = [(listener.cert_file, listener.key_file)]
        else:
            s = settings.server
            chains = self_signed_chains(s.spool_dir / "tls", s.hostname, listener)
        return server_context(listener, chains=chains)

    async def _close(self) -> None:
        """Stop accepting, tell open sessions 421 4.3.2 (a message in DATA finishes first, within
        ``grace``), wait for the connections and for the work they left in the background."""
        servers = self._listeners.close()
        await shutdown(self.context, grace=self.grace)
        for server in servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), self.grace)
        self.context.tls_failures.close()
        if self.context.background:
            await asyncio.gather(*self.context.background, return_exceptions=True)

    # -- reload ----------------------------------------------------------------------------------------
    async def prepare_reload(
        self, settings: Settings, *, sockets: Mapping[str, socket.socket] | None = None
    ) -> ListenerChange:
        """Build every listener's TLS context from ``settings`` and bind the new or moved listeners;
        nothing else changes yet. Raises (``OSError``, ``ssl.SSLError``) with nothing changed.
        ``sockets``: an ingress worker's, the supervisor's listening sockets after its reload (the new
        and moved listeners are served on them rather than bound here)."""
        if sockets is not None:
            self._sockets = dict(sockets)
        endpoints = [self._endpoint(x, settings) for x in settings.listeners]
        return await self._listeners.prepare(endpoints)

    def apply(self, settings: Settings, change: ListenerChange) -> None:
        """Commit a prepared reload: the listeners, then what every new session and MAIL reads."""
        change.commit()
        s, ctx = settings, self.context
        self._settings = settings
        ctx.devices = DeviceDirectory(s.devices)
        ctx.limiter.configure(total=s.server.max_connections, per_ip=s.server.max_connections_per_ip)
        ctx.guard.configure(s.server)
        ctx.hostname = s.server.hostname
        ctx.activity.configure(tuple(d.name for d in s.devices))
        self.grace = s.server.shutdown_grace

    # -- status ----------------------------------------------------------------------------------------
    @property
    def ports(self) -> Mapping[str, int]:
        return self._listeners.ports

    def sockets(self) -> dict[str, socket.socket]:
        """Listener name -> listening socket (what the supervisor hands its ingress workers)."""
        return self._listeners.sockets()

    def connections(self) -> int:
        return self.context.limiter.active

    def refresh_metrics(self) -> None:
        self.context.metrics.connections.set(self.connections())
