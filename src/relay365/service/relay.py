"""The composition root: the relay is one ``AsyncExitStack`` of its services.

::

    async with Relay(settings) as relay:     # or: await relay.start() ... await relay.stop()
        ...

Started in this order, each only once the one before it is up:

1. preflight (secrets, certificates, ports, spool; the transports built from the registry);
2. the spool, opened and recovered for this process's owner id, then the tracking log;
3. ``DeliveryService`` (pacing restored, the scheduler running);
4. ``IngressService`` (every listener bound: devices can connect);
5. ``AdminService`` (the console and API), when ``admin.port`` is set.

Stopped in reverse: the console first; then ingress stops accepting and says 421 4.3.2 to open
sessions (a message in DATA finishes first); delivery finishes what is in flight or gives the claims
back; the tracking log and the spool are closed last. A failure while starting closes everything
started so far, in the same reverse order, and leaves no task running.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path

from relay365.admin.accounts import AccountStore
from relay365.admin.console import Console
from relay365.admin.service import AdminService
from relay365.delivery.scheduler import Scheduler
from relay365.delivery.service import DeliveryService
from relay365.ingress.service import IngressService
from relay365.ingress.tls import self_signed
from relay365.observability.activity import DeviceActivity
from relay365.observability.metrics import Metrics
from relay365.observability.tracking import TrackingLog
from relay365.observability.tracking_pg import PgTrackingLog
from relay365.observability.tracking_sqlite import SqliteTrackingLog
from relay365.replies import classify
from relay365.service.console import RelayParts, SandboxMailboxes, console_deps
from relay365.service.preflight import preflight_for
from relay365.service.sharing import delivery_shares, tracking_log
from relay365.settings import Settings
from relay365.spool.contract import Spool
from relay365.spool.factory import make_spool
from relay365.spool.model import new_owner_id
from relay365.tracing.follower import TraceFollower, start_follower
from relay365.transports.base import Transport

log = logging.getLogger(__name__)


def explain_reply(reply: str) -> str | None:
    """A one-line admin hint for a reply, from the reply-code catalogue when it knows the code."""
    entry = classify(reply)
    if entry is None:
        return None
    return f"{entry.meaning} Fix: {entry.fix}"


def open_tracking(settings: Settings, spool: Spool, *, clock: Callable[[], float] = time.time) -> TrackingLog:
    """The tracking log the settings ask for (not yet opened), where the spool keeps it (sharing.py)."""
    return tracking_log(settings, spool, clock=clock)


def admin_accounts(settings: Settings) -> AccountStore:
    return AccountStore(settings.admin.users_file or settings.server.spool_dir / "admin-users.json")


def admin_certificate(settings: Settings) -> tuple[Path, Path] | None:
    """The console's certificate and key: the configured pair, else the relay's self-signed one."""
    s = settings
    if not s.admin.tls:
        return None
    if s.admin.cert_file and s.admin.key_file:
        return s.admin.cert_file, s.admin.key_file
    return self_signed(s.server.spool_dir / "tls", s.server.hostname)


class Relay:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        mailboxes: SandboxMailboxes | None = None,
    ) -> None:
        """``clock``: wall time for the queue; ``monotonic``: for the AUTH guard and rate limits;
        ``mailboxes``: the sandbox's, shown by the console (the demo)."""
        self.settings = settings
        self.spool: Spool = make_spool(settings, clock=clock)
        self.owner = new_owner_id()  # this process, to the spool's claims
        self.metrics = Metrics()
        self.tracking = open_tracking(settings, self.spool, clock=clock)
        self.activity = DeviceActivity(configured=tuple(d.name for d in settings.devices), clock=clock)
        self.follower: TraceFollower | None = None  # Microsoft 365's message trace ([tracing])
        self.delivery: DeliveryService | None = None
        self.ingress: IngressService | None = None
        self.admin: AdminService | None = None
        self._clock = clock
        self._monotonic = monotonic
        self._mailboxes = mailboxes
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every service in order (module docstring); on a failure close what was started."""
        if self._stack is not None:
            raise RuntimeError("the relay is already running")
        s = self.settings
        async with AsyncExitStack() as stack:
            report = await preflight_for(s)
            for warning in report.warnings:
                log.warning("%s", warning)
            stack.push_async_callback(report.close)  # the transports, until delivery owns them
            await self.spool.open()
            stack.push_async_callback(self.spool.close)
            await self.spool.recover(self.owner)
            if isinstance(self.tracking, SqliteTrackingLog | PgTrackingLog):
                await self.tracking.open()
                stack.push_async_callback(self.tracking.close)
            self.delivery = await stack.enter_async_context(
                DeliveryService(
                    settings=s,
                    spool=self.spool,
                    transports=report.transports,  # closed (and emptied) when delivery stops
                    owner=self.owner,
                    metrics=self.metrics,
                    tracking=self.tracking,
                    clock=self._clock,
                    explain=explain_reply,
                    **delivery_shares(self.spool, owner=self.owner, clock=self._clock),
                )
            )
            self.ingress = await stack.enter_async_context(
                IngressService(
                    settings=s,
                    spool=self.spool,
                    metrics=self.metrics,
                    tracking=self.tracking,
                    activity=self.activity,
                    on_queued=self.delivery.wake,
                    route_reply=self.delivery.route_reply,
                    clock=self._clock,
                    monotonic=self._monotonic,
                )
            )
            # Microsoft 365's side of each delivered message ([tracing]); None when nothing to follow
            self.follower = await start_follower(
                s, tracking=self.tracking, metrics=self.metrics, clock=self._clock
            )
            if self.follower is not None:
                stack.push_async_callback(self.follower.stop)
            if s.admin.port is not None:
                self.admin = await stack.enter_async_context(self._admin_service())
            self._stack = stack.pop_all()

    def _admin_service(self) -> AdminService:
        assert self.delivery is not None and self.ingress is not None
        parts = RelayParts(
            settings=self.settings,
            spool=self.spool,
            ingress=self.ingress,
            delivery=self.delivery,
            metrics=self.metrics,
            tracking=self.tracking,
            activity=self.activity,
            clock=self._clock,
            explain=explain_reply,
            follower=self.follower,
        )
        return AdminService(
            deps=console_deps(parts, mailboxes=self._mailboxes),
            settings=self.settings.admin,
            accounts=admin_accounts(self.settings),
            certificate=admin_certificate(self.settings),
            clock=self._clock,
        )

    async def stop(self, *, grace: float | None = None) -> None:
        """Stop every service in reverse order (module docstring). ``grace``: how long open device
        sessions and deliveries in flight get to finish (default: ``server.shutdown_grace``)."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        if grace is not None:
            for service in (self.ingress, self.delivery):
                if service is not None:
                    service.grace = grace
        await stack.aclose()

    # -- what tests, the demo and serve read -----------------------------------------------------------
    @property
    def ports(self) -> Mapping[str, int]:
        """Listener name -> bound port (empty until started)."""
        return self.ingress.ports if self.ingress is not None else {}

    @property
    def scheduler(self) -> Scheduler | None:
        return self.delivery.scheduler if self.delivery is not None else None

    @property
    def transports(self) -> dict[str, Transport]:
        return self.delivery.transports if self.delivery is not None else {}

    @property
    def console(self) -> Console | None:
        return self.admin.console if self.admin is not None else None

    @property
    def admin_url(self) -> str:
        return self.admin.url if self.admin is not None else ""

    def clock(self) -> float:
        return self._clock()

    def healthy(self) -> bool:
        """False once the delivery scheduler has stopped by itself (the systemd watchdog then restarts)."""
        return self.delivery is not None and self.delivery.running()

    def describe_listeners(self) -> str:
        return ", ".join(
            f"{x.name} {x.address}:{self.ports.get(x.name, x.port)}" for x in self.settings.listeners
        )
