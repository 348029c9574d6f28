"""``serve``: run the relay until SIGTERM/SIGINT, telling systemd how it goes (sd_notify: READY once
every listener accepts, watchdog pings while delivery runs, STOPPING at shutdown)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from relay365.credentials import Redactor, load_secret
from relay365.service.console import SandboxMailboxes
from relay365.service.notify import Notifier
from relay365.service.relay import Relay
from relay365.settings import Settings

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
