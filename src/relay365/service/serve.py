"""``serve``: run the relay until SIGTERM/SIGINT, telling systemd how it goes (sd_notify: READY once
every listener accepts, watchdog pings while delivery runs, STOPPING at shutdown).

SIGHUP (``systemctl reload``: ``ExecReload=/bin/kill -HUP $MAINPID``) reads the config file again and
hands it to ``Relay.reload``: RELOADING=1 first, READY=1 when done. A config that does not load or
pass the preflight, or whose listeners cannot be bound, is refused with ONE error line, and the relay
keeps running as it was (a watchdog keeps pinging: a refused reload is not a failure of the service).
Signals that arrive during a reload make one more reload after it (the file may have changed again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

from relay365.credentials import Redactor, load_secret
from relay365.errors import Relay365Error
from relay365.ingress.service import IngressService
from relay365.logformats import LogFormat
from relay365.service.console import SandboxMailboxes
from relay365.service.notify import Notifier
from relay365.service.relay import Relay
from relay365.service.reload import ReloadReport
from relay365.service.workers import WorkerPool
from relay365.settings import Settings, load_settings
from relay365.spool.sqlite import SqliteSpool

log = logging.getLogger(__name__)


def secrets_of(settings: Settings) -> list[str]:
    """Every upstream secret value, so the log redactor can mask it wherever it appears."""
    values = []
    for t in settings.transports:
        for ref in (t.password, t.m365.client_secret):
            if ref is not None:
                with contextlib.suppress(Exception):
                    values.append(load_secret(ref))
    return values


async def serve(
    settings: Settings,
    *,
    ready: Callable[[Relay], None] = lambda relay: None,
    mailboxes: SandboxMailboxes | None = None,
    notifier: Notifier | None = None,
    load: Callable[[], Settings] | None = None,
    reloaded: Callable[[Relay, ReloadReport], None] = lambda relay, report: None,
    log_format: LogFormat | None = None,
) -> None:
    """Run until SIGTERM/SIGINT. Under systemd (``NOTIFY_SOCKET``): READY=1 once the spool is recovered
    and every listener accepts connections, watchdog pings, STOPPING=1 at shutdown. SIGHUP: reload
    with ``load()`` (default: ``settings.source`` read again); ``reloaded`` is told what changed.
    ``log_format``: the one the log is written in (``serve --log-format``), for the ingress workers."""
    notify = Notifier.from_environ() if notifier is None else notifier
    source = settings.source
    if load is None and source is not None:
        load = lambda: load_settings(source)  # noqa: E731
    reloader = Reloader(load=load, notify=notify, reloaded=reloaded)
    try:
        await _serve(settings, ready, notify, mailboxes, reloader, log_format)
    finally:
        notify.close()


class Reloader:
    """What SIGHUP does: one reload at a time, one more if signalled meanwhile (module docstring)."""

    def __init__(
        self,
        *,
        load: Callable[[], Settings] | None,
        notify: Notifier,
        reloaded: Callable[[Relay, ReloadReport], None],
    ) -> None:
        self._load, self._notify, self._reloaded = load, notify, reloaded
        self.wanted = asyncio.Event()  # set by the signal handler
        # after a reload that took effect: the ingress workers are replaced (service/workers.py)
        self.after: Callable[[], Awaitable[None]] | None = None

    async def run(self, relay: Relay) -> None:
        """Reload each time ``wanted`` is set, until cancelled (a reload under way is finished first:
        it is shielded, and ``serve`` waits for it before stopping the relay)."""
        while True:
            await self.wanted.wait()
            self.wanted.clear()
            task = asyncio.ensure_future(self.reload(relay))
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                await asyncio.gather(task, return_exceptions=True)
                raise

    async def reload(self, relay: Relay) -> bool:
        """One reload; True when the new configuration runs."""
        what = str(relay.settings.source or "the configuration")
        log.info("reloading %s (SIGHUP)", what)
        await self._notify.reloading(f"Reloading {what}")
        try:
            if self._load is None:
                raise Relay365Error("no configuration file to read again (the demo runs without one)")
            report = await relay.reload(self._load())
        except Relay365Error as e:  # ConfigError, ReloadRefused: the running configuration is kept
            log.error("reload refused, still running with the previous configuration: %s", e)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            listening = relay.describe_listeners()
            await self._notify.ready(f"Reload refused ({first}); accepting mail on {listening}")
            return False
        except Exception:  # a bug: said once, and the relay goes on (it was consistent before)
            log.exception("reload failed unexpectedly; still running")
            await self._notify.ready(f"Reload failed; accepting mail on {relay.describe_listeners()}")
            return False
        for line in report.restart_needed:
            log.warning("reload: %s", line)
        for warning in report.warnings:
            log.warning("%s", warning)
        self._reloaded(relay, report)
        if self.after is not None:
            await self.after()
        log.info("reloaded %s: %s", what, report.summary())
        await self._notify.ready(f"Accepting mail on {relay.describe_listeners()}")
        return True


async def _serve(
    settings: Settings,
    ready: Callable[[Relay], None],
    notify: Notifier,
    mailboxes: SandboxMailboxes | None,
    reloader: Reloader,
    log_format: LogFormat | None = None,
) -> None:
    relay = Relay(settings, mailboxes=mailboxes)
    loop = asyncio.get_running_loop()
    # SIGHUP from now on (its default would end the process): one that comes while the spool is being
    # recovered makes a reload right after the start.
    loop.add_signal_handler(signal.SIGHUP, reloader.wanted.set)
    await notify.status("Starting: recovering the spool, opening the listeners")
    try:
        await relay.start()
    except BaseException as e:
        loop.remove_signal_handler(signal.SIGHUP)
        if isinstance(e, Exception):
            await notify.status(f"Failed to start: {make_redactor(settings).redact(str(e))}")
        raise
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pool = worker_pool(relay, log_format=log_format or settings.server.log_format)
    try:
        await pool.start()  # [server] workers - 1 more ingress processes (none for 1)
    except BaseException:
        await pool.stop(grace=0)
        await relay.stop(grace=0)
        raise
    reloader.after = pool.reload
    ready(relay)
    await notify.ready(f"Accepting mail on {relay.describe_listeners()}")
    watchdog = asyncio.create_task(notify.watchdog(healthy=relay.healthy), name="watchdog")
    reloads = asyncio.create_task(reloader.run(relay), name="reloader")
    try:
        await stop.wait()
        log.info("shutting down: no new connections, finishing in-flight messages")
        await notify.stopping("Stopping: no new connections, finishing in-flight messages")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        # systemd stops watching after STOPPING=1. The relay stops last: once its spool is closed the loop
        # must not run again, or a device session still open would reach the closed spool. A reload
        # under way is finished first.
        watchdog.cancel()
        reloads.cancel()
        await asyncio.gather(watchdog, reloads, return_exceptions=True)
        # The workers drain while the relay does; the spool (which commits their messages) is closed
        # only once they are gone.
        grace = relay.settings.server.shutdown_grace
        pool.signal_stop()
        relay.before_spool_close(lambda: pool.stop(grace=grace))
        await relay.stop(grace=grace)


def worker_pool(relay: Relay, *, log_format: LogFormat) -> WorkerPool:
    """The ingress workers of ``relay`` (service/workers.py), reading its current settings and parts."""

    def ingress() -> IngressService:
        assert relay.ingress is not None, "the relay is not running"
        return relay.ingress

    def wake(queue_id: str) -> None:
        if relay.delivery is not None:
            relay.delivery.wake(queue_id)

    def route_reply(sender: str, rcpt: str, device: str) -> str | None:
        return relay.delivery.route_reply(sender, rcpt, device) if relay.delivery is not None else None

    return WorkerPool(
        settings=lambda: relay.settings,
        context=lambda: ingress().context,
        activity=lambda: relay.activity,
        sockets=lambda: ingress().sockets(),
        wake=wake,
        route_reply=route_reply,
        recover=lambda: relay.spool.recover(relay.owner),
        commit=relay.spool.insert_delegated if isinstance(relay.spool, SqliteSpool) else None,
        log_format=log_format,
    )


def make_redactor(settings: Settings) -> Redactor:
    return Redactor(secrets_of(settings))
