"""An ingress worker process: ``python -m relay365.service.worker --control FD --listen NAME=FD ...``.

Started by the supervisor (service/workers.py), never by hand. It serves device sessions on the listening
sockets it inherited and writes what it accepts to the spool under an owner id of its own (so a worker
killed with SIGKILL leaves only its unfinished bodies, which the supervisor's ``recover`` removes once
the worker's owner lock is gone). Everything that is done once, or that must be global, stays in the
supervisor: preflight, recovery, certificates, delivery, the console, sd_notify, SIGHUP; the connection
caps, AUTH counters, rates and metrics (ingress/shared.py).

The first datagram on the control socket is the supervisor's ``Settings`` (pickled: the settings the
supervisor runs with, so no file is read here). The worker says ``ready`` once it accepts connections.
On the orders socket the supervisor sends each reload it applied (its settings and its listening
sockets), which the worker applies the same way (``reload``). SIGTERM, or the orders socket closing,
stops it like ``serve`` stops: no new connections, 421 4.3.2 to open sessions, a message in DATA
finished within ``shutdown_grace``. SIGINT and SIGHUP are the supervisor's to handle. A supervisor
that dies takes its workers with it (``die_with``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import pickle
import signal
import socket
import sys
from typing import TYPE_CHECKING

from relay365.credentials import Redactor
from relay365.ingress.service import IngressService
from relay365.ingress.shared import RemoteCommits, SharedActivity, SharedMetrics, SharedState, SupervisorGone
from relay365.logformats import LOG_FORMATS
from relay365.logsetup import configure_logging
from relay365.observability.tracking import MemoryTrackingLog, TrackingLog
from relay365.observability.tracking_sqlite import SqliteTrackingLog
from relay365.service.sharing import tracking_log
from relay365.settings import Settings
from relay365.spool.factory import make_spool
from relay365.spool.sqlite import SqliteSpool

if TYPE_CHECKING:
    from relay365.observability.tracking_pg import PgTrackingLog

log = logging.getLogger("relay365.service.worker")  # (run as __main__)

MAX_SETTINGS = 1 << 24  # the pickled settings: one datagram
MAX_FDS = 256  # listening sockets passed with a reload (one per listener)


async def run_worker(
    settings: Settings,
    state: SharedState,
    orders: socket.socket,
    sockets: dict[str, socket.socket],
    commits: RemoteCommits,
) -> None:
    """Serve device sessions until SIGTERM or until the supervisor is gone (module docstring)."""
    spool = make_spool(settings)
    if isinstance(spool, SqliteSpool):  # queue.db keeps one writer: the supervisor commits the rows
        spool.delegate_commits(commits)
    await spool.open()
    tracking = tracking_log(settings, spool)
    opened = _to_open(tracking)
    try:
        if opened is not None:
            await opened.open()

        def route_reply(sender: str, rcpt: str, device: str) -> str | None:
            try:
                reply: str | None = state.call("route", sender, rcpt, device)
            except SupervisorGone:
                return "421 4.3.2 Service shutting down, try again later"
            return reply

        ingress = IngressService(
            settings=settings,
            spool=spool,
            metrics=SharedMetrics(state),
            tracking=tracking,
            activity=SharedActivity(state, configured=tuple(d.name for d in settings.devices)),
            on_queued=lambda queue_id: state.tell("queued", queue_id),
            route_reply=route_reply,
            shared=state,
            sockets=sockets,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)

        reloads: set[asyncio.Task[None]] = set()

        def order() -> None:
            """The supervisor's orders: a reload (its settings and listening sockets), or the end of
            the socket (the supervisor is gone: stop)."""
            try:
                data, fds, _flags, _addr = socket.recv_fds(orders, MAX_SETTINGS, MAX_FDS, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as e:
                log.warning("the supervisor's orders cannot be read (%s)", e)
                data, fds = b"", []
            if not data:
                log.warning("the supervisor is gone: stopping")
                state.gone = True
                loop.remove_reader(orders.fileno())
                stop.set()
                return
            new, names = pickle.loads(data)  # noqa: S301  # from our own supervisor
            listening = {name: socket.socket(fileno=fd) for name, fd in zip(names, fds, strict=True)}
            task = loop.create_task(reload(ingress, new, listening))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        async with ingress:
            loop.add_reader(orders.fileno(), order)
            state.tell("ready", os.getpid())
            await stop.wait()
            ignore_further_sigterm(loop)
            log.info("worker %d stopping: no new connections, finishing in-flight messages", os.getpid())
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(orders.fileno())
            if reloads:
                await asyncio.gather(*reloads, return_exceptions=True)
    finally:
        if opened is not None:
            await opened.close()
        await spool.close()


async def reload(ingress: IngressService, settings: Settings, sockets: dict[str, socket.socket]) -> None:
    """Apply the supervisor's reloaded settings as ``Relay.reload`` does for its own ingress: open
    sessions go on (and follow the new device table from their next MAIL); listeners the reload added
    or moved are served on the sockets the supervisor bound, removed ones stop accepting here too."""
    try:
        change = await ingress.prepare_reload(settings, sockets=sockets)
    except (OSError, ValueError) as e:  # the supervisor checked the same files a moment ago
        log.error("worker %d: the reload cannot be applied (%s): stopping, to be replaced", os.getpid(), e)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    for name in change.kept:  # (the socket this worker serves already; the copy is not needed)
        sockets.pop(name).close()
    ingress.apply(settings, change)
    logging.getLogger().setLevel(settings.server.log_level)
    log.info("worker %d reloaded: %s", os.getpid(), change.describe())


def ignore_further_sigterm(loop: asyncio.AbstractEventLoop) -> None:
    """The stop is under way (the supervisor kills a worker that does not finish in time): another
    SIGTERM changes nothing. Left to asyncio, one that came while the loop was closing was written to
    its closed wake-up pipe ("Exception ignored ... Bad file descriptor" on stderr, in the middle of the
    journal or JSON log) or, once the loop had put the default action back, ended the worker with -15.
    Blocked while asyncio's handler gives way to SIG_IGN, so none falls between the two."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _to_open(tracking: TrackingLog) -> SqliteTrackingLog | PgTrackingLog | None:
    """The tracking log to open and close (None: the memory one, when tracking is off)."""
    if isinstance(tracking, SqliteTrackingLog | MemoryTrackingLog):
        return tracking if isinstance(tracking, SqliteTrackingLog) else None
    from relay365.observability.tracking_pg import PgTrackingLog  # (psycopg: a PostgreSQL spool only)

    assert isinstance(tracking, PgTrackingLog), type(tracking)
    return tracking


PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies


def die_with(supervisor: int) -> None:
    """SIGKILL when the supervisor dies (prctl PR_SET_PDEATHSIG, Linux). A worker cannot commit a
    message without its supervisor, and a supervisor killed with SIGKILL is a crash of the relay: its
    workers go with it, and the next start recovers the spool as after any crash (their half-written
    bodies are removed once their owner locks are gone)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != supervisor:  # it died before the prctl
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relay365-worker", description=__doc__)
    parser.add_argument("--control", type=int, required=True)
    parser.add_argument("--orders", type=int, required=True)
    parser.add_argument("--commits", type=int, required=True)
    parser.add_argument("--supervisor", type=int, required=True, help="its pid")
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, default=None, help="serve's (its flag or config)"
    )
    parser.add_argument("--listen", action="append", default=[], help="NAME=FD")
    args = parser.parse_args(argv)
    die_with(args.supervisor)
    # Ctrl-C in a terminal reaches the whole process group: the supervisor decides (it sends SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    control = socket.socket(fileno=args.control)
    settings = pickle.loads(control.recv(MAX_SETTINGS))  # noqa: S301  # from our own supervisor
    assert isinstance(settings, Settings)
    configure_logging(settings.server.log_level, Redactor([]), args.log_format or settings.server.log_format)
    sockets = {}
    for item in args.listen:
        name, _, fd = item.partition("=")
        sockets[name] = socket.socket(fileno=int(fd))
    state = SharedState(control)
    orders = socket.socket(fileno=args.orders)
    orders.setblocking(False)
    commits = RemoteCommits(socket.socket(fileno=args.commits))
    try:
        asyncio.run(run_worker(settings, state, orders, sockets, commits))
    except SupervisorGone:
        return 1
    finally:
        state.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
