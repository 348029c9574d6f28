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

``reload(settings)`` (SIGHUP, ``systemctl reload``; a supervisor forwards it to each worker the same
way) applies a new configuration to the running relay, all or nothing. First what can fail: the
preflight (as at start: secrets, certificates, transports built), the new and moved listeners bound,
the console restarted if ``[admin]`` changed. If any of these fails, what was done is undone and
``ReloadRefused`` says why: the relay runs on exactly as before. Then, in one step without an await
that could fail: ingress (devices, caps, listeners), delivery (routes, changed transports) and the
console's view of the settings. Open sessions and queued mail are not touched (service/reload.py,
ingress/listeners.py, the services' ``reload``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from relay365.delivery.scheduler import Scheduler
from relay365.delivery.service import DeliveryService
from relay365.errors import Relay365Error, ReloadRefused
from relay365.ingress.service import IngressService
from relay365.observability.activity import DeviceActivity
from relay365.observability.metrics import Metrics
from relay365.observability.tracking import TrackingLog
from relay365.observability.tracking_sqlite import SqliteTrackingLog
from relay365.replies import classify
from relay365.service.console import RelayParts, SandboxMailboxes, console_deps
from relay365.service.preflight import PreflightReport, preflight_for
from relay365.service.reload import (
    ReloadReport,
    admin_fingerprint,
    pin_restart_only,
    transport_fingerprints,
)
from relay365.service.sharing import delivery_shares, follow_store, tracking_log
from relay365.settings import Settings
from relay365.spool.contract import Spool
from relay365.spool.factory import make_spool
from relay365.spool.model import new_owner_id
from relay365.tracing.apps import follow_plan
from relay365.tracing.work import FollowStore
from relay365.transports.base import Transport

if TYPE_CHECKING:  # imported where used: a relay without a console or [tracing] never loads them (issue 11)
    from relay365.admin.accounts import AccountStore
    from relay365.admin.console import Console
    from relay365.admin.service import AdminService
    from relay365.observability.tracking_pg import PgTrackingLog
    from relay365.tracing.follower import TraceFollower

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
    from relay365.admin.accounts import AccountStore

    return AccountStore(settings.admin.users_file or settings.server.spool_dir / "admin-users.json")


def admin_certificate(settings: Settings) -> tuple[Path, Path] | None:
    """The console's certificate and key: the configured pair, else the relay's self-signed one."""
    s = settings
    if not s.admin.tls:
        return None
    if s.admin.cert_file and s.admin.key_file:
        return s.admin.cert_file, s.admin.key_file
    from relay365.ingress.tls import self_signed  # cryptography: only when a certificate must be made

    return self_signed(s.server.spool_dir / "tls", s.server.hostname)


def stored_tracking(tracking: TrackingLog) -> SqliteTrackingLog | PgTrackingLog | None:
    """``tracking`` if it is kept in a database (opened and closed with the relay). (tracking_pg, and
    psycopg, are imported only when sharing.py made a PostgreSQL log.)"""
    if isinstance(tracking, SqliteTrackingLog):
        return tracking
    module = sys.modules.get("relay365.observability.tracking_pg")
    if module is not None and isinstance(tracking, module.PgTrackingLog):
        pg: PgTrackingLog = tracking
        return pg
    return None


async def follow(
    settings: Settings,
    *,
    tracking: TrackingLog,
    store: FollowStore,
    metrics: Metrics,
    clock: Callable[[], float],
) -> TraceFollower | None:
    """The trace follower ([tracing]), or None when nothing is followed: its package (the Graph client,
    msal, httpx) is imported only then."""
    if not settings.tracing.enabled:
        return None
    if settings.tracking.enabled and not (plan := follow_plan(settings)).transports and not plan.skipped:
        return None  # no Microsoft 365 transport with an app: nothing to follow, nothing to log
    from relay365.tracing.follower import start_follower

    return await start_follower(settings, tracking=tracking, store=store, metrics=metrics, clock=clock)


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
        self._parts: RelayParts | None = None  # what the console reads (settings follow reloads)
        self._transport_prints: dict[str, str] = {}  # service/reload.py: what a reload compares
        self._admin_print = ""
        self._reloading = asyncio.Lock()
        self._spool_users: list[Callable[[], Awaitable[None]]] = []  # before_spool_close

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
            self._transport_prints = transport_fingerprints(s)
            await self.spool.open()
            stack.push_async_callback(self.spool.close)
            stack.push_async_callback(self._spool_users_done)
            await self.spool.recover(self.owner)
            if (stored := stored_tracking(self.tracking)) is not None:
                await stored.open()
                stack.push_async_callback(stored.close)
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
            self.follower = await follow(
                s,
                tracking=self.tracking,
                store=follow_store(s, self.spool),
                metrics=self.metrics,
                clock=self._clock,
            )
            if self.follower is not None:
                stack.push_async_callback(self.follower.stop)
            self._parts = RelayParts(
                settings=s,
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
            stack.push_async_callback(self._stop_admin)  # whichever console runs then (reloads)
            await self._start_admin(s)
            self._stack = stack.pop_all()

    async def _start_admin(self, settings: Settings) -> None:
        """The console of ``settings`` (none when ``admin.port`` is not set)."""
        self._admin_print = admin_fingerprint(settings.admin, settings.server.hostname)
        if settings.admin.port is None:
            return
        assert self._parts is not None
        from relay365.admin.service import AdminService  # starlette, uvicorn, jinja2: only for a console

        admin = AdminService(
            deps=console_deps(self._parts, mailboxes=self._mailboxes),
            settings=settings.admin,
            accounts=admin_accounts(settings),
            certificate=admin_certificate(settings),
            clock=self._clock,
        )
        await admin.__aenter__()
        self.admin = admin

    async def _stop_admin(self) -> None:
        admin, self.admin = self.admin, None
        if admin is not None:
            await admin.__aexit__(None, None, None)

    def before_spool_close(self, wait: Callable[[], Awaitable[None]]) -> None:
        """At ``stop``, await ``wait()`` after the services stopped and before the spool is closed (the
        ingress workers of service/workers.py: the supervisor's spool commits their messages)."""
        self._spool_users.append(wait)

    async def _spool_users_done(self) -> None:
        users, self._spool_users = self._spool_users, []
        for wait in users:
            await wait()

    async def stop(self, *, grace: float | None = None) -> None:
        """Stop every service in reverse order (module docstring). ``grace``: how long open device
        sessions and deliveries in flight get to finish (default: ``server.shutdown_grace``)."""
        async with self._reloading:  # a reload under way is finished first
            stack, self._stack = self._stack, None
        if stack is None:
            return
        if grace is not None:
            for service in (self.ingress, self.delivery):
                if service is not None:
                    service.grace = grace
        await stack.aclose()

    # -- reload ----------------------------------------------------------------------------------------
    async def reload(self, settings: Settings) -> ReloadReport:
        """Apply ``settings`` to the running relay, or raise ``ReloadRefused`` and change nothing (module
        docstring). One reload at a time; the next waits for the one under way."""
        async with self._reloading:
            if self._stack is None or self.ingress is None or self.delivery is None:
                raise ReloadRefused("the relay is not running")
            old = self.settings
            new, restart_needed = pin_restart_only(old, settings)
            try:
                built = await preflight_for(new)
            except Relay365Error as e:
                raise ReloadRefused(str(e)) from e
            try:
                return await self._apply(old, new, built, restart_needed)
            finally:
                await built.close()  # what was built and not taken over: unused

    async def _apply(
        self, old: Settings, new: Settings, built: PreflightReport, restart_needed: list[str]
    ) -> ReloadReport:
        assert self.ingress is not None and self.delivery is not None and self._parts is not None
        prints = transport_fingerprints(new)
        changed = {n: t for n, t in built.transports.items() if prints[n] != self._transport_prints.get(n)}
        try:
            listeners = await self.ingress.prepare_reload(new)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            raise ReloadRefused(f"a listener cannot be opened: {e}") from e
        try:
            console = await self._reload_admin(old, new)
        except (OSError, ValueError) as e:
            await listeners.rollback()
            raise ReloadRefused(f"the admin console cannot be opened: {e}") from e
        # From here on nothing awaits or fails: the new configuration takes over in one step.
        report = ReloadReport(listeners=listeners.describe(), console=console)
        report.listeners_added = list(listeners.added)
        report.devices(old, new)
        report.restart_needed, report.warnings = restart_needed, list(built.warnings)
        report.transports_added = [n for n in changed if n not in self._transport_prints]
        report.transports_replaced = [n for n in changed if n in self._transport_prints]
        report.transports_removed = [n for n in self._transport_prints if n not in prints]
        self.ingress.apply(new, listeners)
        self.delivery.reload(new, changed)
        for name in changed:
            del built.transports[name]  # delivery owns them now
        if isinstance(self.tracking, SqliteTrackingLog):
            t = new.tracking
            self.tracking.configure(retention_days=t.retention_days, log_events=t.log_events)
        self._transport_prints = prints
        self.settings = self._parts.settings = new
        return report

    async def _reload_admin(self, old: Settings, new: Settings) -> str:
        """Restart the console if its settings or files changed; if the new one cannot start, the old
        one is started again and the error raised."""
        if admin_fingerprint(new.admin, new.server.hostname) == self._admin_print:
            return "unchanged"
        await self._stop_admin()
        try:
            await self._start_admin(new)
        except BaseException:
            try:
                await self._start_admin(old)
            except (OSError, ValueError) as e:
                log.error("the admin console could not be started again with the old settings: %s", e)
            raise
        if new.admin.port is None:
            return "stopped"
        return "restarted" if old.admin.port is not None else "started"

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
