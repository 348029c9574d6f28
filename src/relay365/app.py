"""The composition root: the only place that wires the stages together.

ingress (listeners) -> spool -> scheduler -> router -> transports
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import ssl
import time
from collections.abc import Callable

from relay365.admin.api import AdminServer
from relay365.admin.metrics import Metrics
from relay365.credentials import Redactor, load_secret
from relay365.delivery.router import NoRoute, Router
from relay365.delivery.scheduler import Scheduler
from relay365.errors import ConfigError
from relay365.ingress.context import IngressContext, shutdown
from relay365.ingress.handshake import HandshakeLog
from relay365.ingress.identity import AuthGuard, ConnectionLimiter, DeviceDirectory
from relay365.ingress.policy import RateLimiter
from relay365.ingress.server import start_listener
from relay365.ingress.tls import self_signed_chains, server_context
from relay365.preflight import PreflightReport, preflight
from relay365.settings import ListenerSettings, Settings, TransportSettings
from relay365.spool.contract import Spool
from relay365.spool.factory import make_spool
from relay365.spool.model import new_owner_id
from relay365.transports.base import Transport
from relay365.transports.connector import ConnectorTransport
from relay365.transports.direct_send import DirectSendTransport, domain_rule
from relay365.transports.graph import GraphTransport
from relay365.transports.smarthost import SmartHostTransport
from relay365.transports.submission import SubmissionTransport

log = logging.getLogger(__name__)


def explain_reply(reply: str) -> str | None:
    """A one-line admin hint for a reply, from the reply-code catalogue when it knows the code."""
    try:
        from relay365.diagnostics.catalogue import classify
    except ImportError:
        return None
    entry = classify(reply)
    if entry is None:
        return None
    return f"{entry.meaning} Fix: {entry.fix}"


def build_transport(settings: TransportSettings, *, hostname: str) -> Transport:
    kinds: dict[str, Callable[..., Transport]] = {
        "smarthost": SmartHostTransport,
        "submission": SubmissionTransport,
        "direct_send": DirectSendTransport,
        "connector": ConnectorTransport,
        "graph": GraphTransport,
    }
    if settings.type not in kinds:
        raise ConfigError(
            f"transport {settings.name}.type",
            settings.type,
            "This transport type is not available in this build.",
        )
    return kinds[settings.type](settings, helo_name=hostname)


# The transports that can send mail from the null sender <> as it is (RFC 5321 4.5.5). SMTP AUTH
# submission sends as its mailbox: Exchange refuses any other sender, <> included, with 5.7.60 (a
# login may send only as itself or a mailbox it has Send As on); Graph has no envelope sender at all
# (the mailbox in the URL becomes the sender and would get the bounces). An MX (Direct Send,
# connector) or a smart host accepts <> like any SMTP server must. See README, "The null sender".
NULL_SENDER_TYPES = frozenset({"smarthost", "direct_send", "connector"})


def null_sender_transports(settings: Settings) -> frozenset[str]:
    return frozenset(t.name for t in settings.transports if t.type in NULL_SENDER_TYPES)


def null_route_reply(router: Router) -> Callable[[str, str, str], str | None]:
    """For ingress: refuse at RCPT a recipient of mail from <> that no route can carry."""

    def reply(sender: str, rcpt: str, device: str) -> str | None:
        try:
            router.choose(rcpt=rcpt, sender=sender, device=device, size=0)
        except NoRoute as e:
            return f"550 5.7.1 {e}"
        return None

    return reply


def transport_rules(settings: Settings) -> dict[str, Callable[[str], bool]]:
    """Each transport's own recipient rule (Direct Send: only the tenant's accepted domains)."""
    rules: dict[str, Callable[[str], bool]] = {}
    for t in settings.transports:
        if t.type == "direct_send":
            rules[t.name] = domain_rule(t.m365.accepted_domains)
    return rules


def secrets_of(settings: Settings) -> list[str]:
    """Every upstream secret value, so the log redactor can mask it wherever it appears."""
    values = []
    for t in settings.transports:
        for ref in (t.password, t.m365.client_secret):
            if ref is not None:
                with contextlib.suppress(Exception):
                    values.append(load_secret(ref))
    return values


async def preflight_for(settings: Settings) -> PreflightReport:
    """The preflight ``serve`` runs before it binds a port, and ``config check`` runs on its own."""
    return await preflight(
        settings, build_transport=functools.partial(build_transport, hostname=settings.server.hostname)
    )


class Relay:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: wall time for the queue; ``monotonic``: for the AUTH guard and rate limits."""
        self.settings = settings
        self.spool: Spool = make_spool(settings, clock=clock)
        self.owner = new_owner_id()  # this process, to the spool's claims
        self._clock = clock
        self._monotonic = monotonic
        self.transports: dict[str, Transport] = {}
        self.scheduler: Scheduler | None = None
        self.ingress: IngressContext | None = None
        self._servers: list[asyncio.Server] = []
        self._scheduler_task: asyncio.Task[None] | None = None
        self.ports: dict[str, int] = {}
        self.metrics = Metrics()
        self.admin: AdminServer | None = None

    def _tls(self, listener: ListenerSettings) -> ssl.SSLContext | None:
        if listener.tls == "none":
            return None
        if listener.cert_file and listener.key_file:
            chains = [(listener.cert_file, listener.key_file)]
        else:
            s = self.settings.server
            chains = self_signed_chains(s.spool_dir / "tls", s.hostname, listener)
        return server_context(listener, chains=chains)

    async def start(self) -> None:
        s = self.settings
        report = await preflight_for(s)
        for warning in report.warnings:
            log.warning("%s", warning)
        self.transports.update(report.transports)
        await self.spool.open()
        await self.spool.recover(self.owner)
        router = Router(s.routes, accepts=transport_rules(s), null_sender=null_sender_transports(s))
        self.scheduler = Scheduler(
            spool=self.spool,
            router=router,
            transports=self.transports,
            settings=s.delivery,
            hostname=s.server.hostname,
            clock=self._clock,
            explain=explain_reply,
            metrics=self.metrics,
            owner=self.owner,
        )
        await self.scheduler.load_pacing()
        self.ingress = IngressContext(
            spool=self.spool,
            devices=DeviceDirectory(s.devices),
            limiter=ConnectionLimiter(total=s.server.max_connections, per_ip=s.server.max_connections_per_ip),
            guard=AuthGuard(s.server, clock=self._monotonic),
            rates=RateLimiter(clock=self._monotonic),
            hostname=s.server.hostname,
            on_queued=self.scheduler.wake,
            metrics=self.metrics,
            tls_failures=HandshakeLog(clock=self._clock),
            route_reply=null_route_reply(router),
        )
        for listener in s.listeners:
            server = await start_listener(self.ingress, listener, self._tls(listener))
            self._servers.append(server)
            self.ports[listener.name] = server.sockets[0].getsockname()[1]
            log.info(
                "listening on %s:%d (%s, tls=%s)",
                listener.address,
                self.ports[listener.name],
                listener.name,
                listener.tls,
            )
        self._scheduler_task = asyncio.create_task(self.scheduler.run(), name="scheduler")
        if s.admin.port is not None:
            self.admin = AdminServer(self, s.admin.address, s.admin.port)
            await self.admin.start()
            log.info(
                "admin endpoint on http://%s:%d/ (metrics, health, queue)", s.admin.address, self.admin.port
            )

    def clock(self) -> float:
        return self._clock()

    async def stop(self, *, grace: float = 30.0) -> None:
        """Stop accepting, tell open sessions 421 4.3.2 (a message in DATA finishes first, within
        ``grace``), let commits finish, then stop delivery and close the spool."""
        if self.admin is not None:
            await self.admin.stop()
        for server in self._servers:
            server.close()
        if self.ingress is not None:
            await shutdown(self.ingress, grace=grace)
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), grace)
        if self.ingress is not None:
            self.ingress.tls_failures.close()
        if self.ingress is not None and self.ingress.background:
            await asyncio.gather(*self.ingress.background, return_exceptions=True)
        if self.scheduler is not None:
            await self.scheduler.stop(grace=grace)
        if self._scheduler_task is not None:
            self._scheduler_task.cancel()
            await asyncio.gather(self._scheduler_task, return_exceptions=True)
        for t in self.transports.values():
            await t.close()
        await self.spool.close()


async def serve(settings: Settings, *, ready: Callable[[Relay], None] = lambda relay: None) -> None:
    relay = Relay(settings)
    await relay.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready(relay)
    try:
        await stop.wait()
        log.info("shutting down: no new connections, finishing in-flight messages")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await relay.stop(grace=settings.server.shutdown_grace)


def make_redactor(settings: Settings) -> Redactor:
    return Redactor(secrets_of(settings))
