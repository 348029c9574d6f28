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

from relay365.admin.accounts import AccountStore
from relay365.admin.console import Console
from relay365.admin.server import AdminServer, build_console, create_app, tls_context
from relay365.console_adapter import RelayParts, SandboxMailboxes, console_deps
from relay365.credentials import Redactor, load_secret
from relay365.delivery.router import NoRoute, Router
from relay365.delivery.scheduler import Scheduler
from relay365.ingress.context import IngressContext, shutdown
from relay365.ingress.handshake import HandshakeLog
from relay365.ingress.identity import AuthGuard, ConnectionLimiter, DeviceDirectory
from relay365.ingress.policy import RateLimiter
from relay365.ingress.server import start_listener
from relay365.ingress.tls import self_signed, self_signed_chains, server_context
from relay365.observability.activity import DeviceActivity
from relay365.observability.metrics import Metrics
from relay365.observability.tracking import MemoryTrackingLog, TrackingLog
from relay365.observability.tracking_sqlite import SqliteTrackingLog
from relay365.preflight import PreflightReport, preflight
from relay365.replies import classify
from relay365.service.notify import Notifier
from relay365.settings import ListenerSettings, Settings
from relay365.spool.contract import Spool
from relay365.spool.factory import make_spool
from relay365.spool.model import new_owner_id
from relay365.tracing.follower import TraceFollower, start_follower
from relay365.transports.base import Transport
from relay365.transports.registry import build_transport, null_sender_transports, recipient_rules

log = logging.getLogger(__name__)


def explain_reply(reply: str) -> str | None:
    """A one-line admin hint for a reply, from the reply-code catalogue when it knows the code."""
    entry = classify(reply)
    if entry is None:
        return None
    return f"{entry.meaning} Fix: {entry.fix}"


def null_route_reply(router: Router) -> Callable[[str, str, str], str | None]:
    """For ingress: refuse at RCPT a recipient of mail from <> that no route can carry."""

    def reply(sender: str, rcpt: str, device: str) -> str | None:
        try:
            router.choose(rcpt=rcpt, sender=sender, device=device, size=0)
        except NoRoute as e:
            return f"550 5.7.1 {e}"
        return None

    return reply


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


def open_tracking(settings: Settings, *, clock: Callable[[], float] = time.time) -> TrackingLog:
    """The tracking log the settings ask for (not yet opened): SQLite beside the queue, or memory."""
    t = settings.tracking
    if not t.enabled:
        return MemoryTrackingLog(clock=clock)
    return SqliteTrackingLog(
        t.path or settings.server.spool_dir / "tracking.db",
        retention_days=t.retention_days,
        clock=clock,
        log_events=t.log_events,
    )


def admin_accounts(settings: Settings) -> AccountStore:
    return AccountStore(settings.admin.users_file or settings.server.spool_dir / "admin-users.json")


class Relay:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        mailboxes: SandboxMailboxes | None = None,
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
        self.console: Console | None = None
        self.tracking = open_tracking(settings, clock=clock)
        self.follower: TraceFollower | None = None  # Microsoft 365's message trace ([tracing])
        self.activity = DeviceActivity(configured=tuple(d.name for d in settings.devices), clock=clock)
        self._mailboxes = mailboxes

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
        if isinstance(self.tracking, SqliteTrackingLog):
            await self.tracking.open()
        router = Router(s.routes, accepts=recipient_rules(s), null_sender=null_sender_transports(s))
        self.scheduler = Scheduler(
            spool=self.spool,
            router=router,
            transports=self.transports,
            settings=s.delivery,
            hostname=s.server.hostname,
            clock=self._clock,
            explain=explain_reply,
            metrics=self.metrics,
            tracking=self.tracking,
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
            tracking=self.tracking,
            activity=self.activity,
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
        self.follower = await start_follower(
            s, tracking=self.tracking, metrics=self.metrics, clock=self._clock
        )
        if s.admin.port is not None:
            await self._start_console()

    async def _start_console(self) -> None:
        s = self.settings
        assert self.scheduler is not None and self.ingress is not None
        parts = RelayParts(
            settings=s,
            spool=self.spool,
            scheduler=self.scheduler,
            limiter=self.ingress.limiter,
            transports=self.transports,
            ports=self.ports,
            metrics=self.metrics,
            tracking=self.tracking,
            activity=self.activity,
            clock=self._clock,
            explain=explain_reply,
            follower=self.follower,
        )
        accounts = admin_accounts(s)
        self.console = build_console(
            console_deps(parts, mailboxes=self._mailboxes), s.admin, accounts=accounts, clock=self._clock
        )
        context = None
        if s.admin.tls:
            cert, key = (
                (s.admin.cert_file, s.admin.key_file)
                if s.admin.cert_file and s.admin.key_file
                else self_signed(s.server.spool_dir / "tls", s.server.hostname)
            )
            context = tls_context(cert, key)
        assert s.admin.port is not None
        self.admin = AdminServer(
            create_app(self.console, s.admin), address=s.admin.address, port=s.admin.port, ssl_context=context
        )
        await self.admin.start()
        log.info("admin console on %s", self.admin_url)
        if not accounts.users():
            log.warning("no admin accounts yet: create one with 'relay365 admin passwd NAME'")

    @property
    def admin_url(self) -> str:
        if self.admin is None:
            return ""
        host = self.settings.admin.address
        host = f"[{host}]" if ":" in host else host
        return f"{self.admin.scheme}://{host}:{self.admin.port}/"

    def clock(self) -> float:
        return self._clock()

    def healthy(self) -> bool:
        """False once the delivery scheduler has stopped by itself (the systemd watchdog then restarts)."""
        return self._scheduler_task is not None and not self._scheduler_task.done()

    def describe_listeners(self) -> str:
        return ", ".join(
            f"{x.name} {x.address}:{self.ports.get(x.name, x.port)}" for x in self.settings.listeners
        )

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
        if self.follower is not None:
            await self.follower.stop()
        if isinstance(self.tracking, SqliteTrackingLog):
            await self.tracking.close()
        await self.spool.close()


async def serve(
    settings: Settings,
    *,
    ready: Callable[[Relay], None] = lambda relay: None,
    mailboxes: SandboxMailboxes | None = None,
    notifier: Notifier | None = None,
) -> None:
    """Run until SIGTERM/SIGINT. Under systemd (``NOTIFY_SOCKET``): READY=1 once the spool is recovered
    and every listener accepts connections, watchdog pings, STOPPING=1 at shutdown."""
    notify = Notifier.from_environ() if notifier is None else notifier
    try:
        await _serve(settings, ready, notify, mailboxes)
    finally:
        notify.close()


async def _serve(
    settings: Settings,
    ready: Callable[[Relay], None],
    notify: Notifier,
    mailboxes: SandboxMailboxes | None,
) -> None:
    relay = Relay(settings, mailboxes=mailboxes)
    await notify.status("Starting: recovering the spool, opening the listeners")
    try:
        await relay.start()
    except Exception as e:
        await notify.status(f"Failed to start: {make_redactor(settings).redact(str(e))}")
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready(relay)
    await notify.ready(f"Accepting mail on {relay.describe_listeners()}")
    watchdog = asyncio.create_task(notify.watchdog(healthy=relay.healthy), name="watchdog")
    try:
        await stop.wait()
        log.info("shutting down: no new connections, finishing in-flight messages")
        await notify.stopping("Stopping: no new connections, finishing in-flight messages")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        # systemd stops watching after STOPPING=1. The relay stops last: once its spool is closed the loop
        # must not run again, or a device session still open would reach the closed spool.
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)
        await relay.stop(grace=settings.server.shutdown_grace)


def make_redactor(settings: Settings) -> Redactor:
    return Redactor(secrets_of(settings))
