"""Ingress worker processes (``[server] workers``): the supervisor's side.

With ``workers = N`` the ``serve`` process is the supervisor: it does everything it does with one process
(preflight, spool recovery, self-signed certificates, delivery, the console, sd_notify, SIGHUP) and
serves device sessions itself, and it starts ``N - 1`` worker processes (service/worker.py) that
inherit its listening sockets: the kernel hands each new connection to whichever process accepts it
first. ``workers = 1`` starts none: the relay is the one process it always was.

Global limits stay global: each worker reaches the supervisor's connection limiter, AUTH guard, rate
limiter and metrics over a socket pair (ingress/shared.py); this module answers it on the supervisor's
event loop, with the same objects the supervisor's own sessions use. It also remembers what each worker
holds (connection slots, passwords being verified) to give it back when a worker dies.

* A worker writes each body itself (``messages/<its owner>/``, fsynced) and, with the SQLite spool,
  hands the rows of each group commit to the supervisor, which writes them to queue.db
  (``SqliteSpool.insert_delegated``) before the worker's 250: queue.db has one writing process. Two
  writers measured 3.6x slower at 4 KB (77 against 282 msgs/s, issue 11): SQLite's busy handler sleeps
  in steps of milliseconds while another process holds the write lock. PostgreSQL takes concurrent
  writers: there each worker commits itself.
* A worker that exits without being asked (SIGKILL, a crash) is replaced: what it held is released,
  the spool is recovered (``Spool.recover``: its unfinished bodies, once its owner lock is gone; every
  message it acknowledged was committed before its 250), and a new worker is started (after a pause
  if it died young, so a worker that cannot start does not spin).
* SIGTERM: every worker is told SIGTERM and drains as the supervisor does (421 4.3.2 to its sessions,
  a message in DATA finished within ``shutdown_grace``); one that is still running after the grace
  and a margin is killed.
* A reload (SIGHUP) that succeeded is forwarded: each worker gets the new settings and the listening
  sockets as the reload left them (over a second socket pair, the sockets as SCM_RIGHTS) and applies
  them as the supervisor did: open sessions go on and follow the new device table from their next
  MAIL, added listeners are served, removed ones stop accepting. A changed ``workers`` starts or
  stops workers. (One thing a reload cannot do with workers: move a port between listeners on the
  same address: the workers still hold the old socket, so the new bind fails and the reload is
  refused, all or nothing; a restart does it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from relay365.errors import SpoolError
from relay365.ingress.context import IngressContext
from relay365.ingress.shared import LENGTH_SIZE, MAX_MESSAGE, frame, length_of
from relay365.logformats import LogFormat
from relay365.observability.activity import DeviceActivity
from relay365.settings import DeviceSettings, Settings
from relay365.spool.sqlite import Rows

log = logging.getLogger(__name__)

# the requests a worker waits on (ingress/shared.py ``call``); the others are told, never answered
ASKED = frozenset({"admit", "blocked", "begin", "failure", "rate", "route"})
READY_TIMEOUT = 60.0  # seconds a new worker gets to say it accepts connections
STOP_MARGIN = 10.0  # seconds past the grace before a worker that does not stop is killed
YOUNG = 5.0  # a worker that dies sooner than this after its start is restarted after a pause
RESTART_PAUSE = 1.0


@dataclass
class _Worker:
    proc: asyncio.subprocess.Process
    sock: socket.socket  # its requests (ingress/shared.py), answered
    orders: socket.socket  # reloads, sent; closed: the worker stops (the supervisor is gone)
    started: float
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False
    held: Counter[str] = field(default_factory=Counter)  # connection slots by peer address
    verifying: Counter[tuple[str, str]] = field(default_factory=Counter)  # (address, user) in AUTH
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


class WorkerPool:
    """The supervisor's ingress workers (module docstring)."""

    def __init__(
        self,
        *,
        settings: Callable[[], Settings],
        context: Callable[[], IngressContext],
        activity: Callable[[], DeviceActivity],
        sockets: Callable[[], dict[str, socket.socket]],
        wake: Callable[[str], None],
        route_reply: Callable[[str, str, str], str | None],
        recover: Callable[[], Any],
        commit: Callable[[Rows, float, str], Awaitable[None]] | None = None,
        log_format: LogFormat = "auto",
        command: tuple[str, ...] = (sys.executable, "-m", "relay365.service.worker"),
    ) -> None:
        """``settings``, ``context``, ``sockets``: the supervisor's current ones (reloads change them);
        ``wake``: delivery's wake-up for a queued message; ``recover``: the spool's recovery (awaited);
        ``commit``: the SQLite spool's ``insert_delegated``, which writes the workers' rows (None for a
        PostgreSQL spool: each worker writes its own)."""
        self._commit = commit
        self._settings, self._context, self._sockets = settings, context, sockets
        self._activity = activity
        self._wake, self._route_reply, self._recover = wake, route_reply, recover
        self._command = (*command, "--log-format", log_format)
        self._workers: list[_Worker] = []
        self._closing = False

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if not w.stopping]

    async def start(self) -> None:
        """Start ``workers - 1`` workers and wait until each accepts connections."""
        count = self._settings().server.workers - 1
        started = [await self._spawn() for _ in range(count)]
        await asyncio.gather(*(self._until_ready(w) for w in started))

    async def reload(self) -> None:
        """After the supervisor's reload: each worker gets the new settings and the listening sockets
        as the reload left them, and applies them as the supervisor did (``worker.reload``: open
        sessions go on). Then as many workers are started or stopped as the new ``workers`` asks."""
        settings, listening = self._settings(), self._sockets()
        payload = pickle.dumps((settings, list(listening)))
        fds = [s.fileno() for s in listening.values()]
        live = [w for w in self._workers if not w.stopping]
        for w in live:
            try:
                socket.send_fds(w.orders, [payload], fds)
            except OSError as e:  # it is exiting: replaced with the new settings
                log.warning("ingress worker %d did not take the reload: %s", w.proc.pid, e)
        want = settings.server.workers - 1
        if len(live) > want:
            self._signal_stop(live[want:])
        started = [await self._spawn() for _ in range(want - len(live))]
        await asyncio.gather(*(self._until_ready(w) for w in started))

    def signal_stop(self) -> None:
        """SIGTERM to every worker (they drain); ``stop`` waits for them."""
        self._closing = True
        self._signal_stop(list(self._workers))

    async def stop(self, *, grace: float) -> None:
        """SIGTERM to every worker; wait for them (killing one still there after ``grace`` + a margin)."""
        self._closing = True
        await self._stop_all(list(self._workers), grace=grace)

    # -- one worker ------------------------------------------------------------------------------------
    async def _spawn(self) -> _Worker:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        orders, their_orders = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        commits, their_commits = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        listening = self._sockets()
        args = [*self._command, "--control", str(theirs.fileno()), "--orders", str(their_orders.fileno())]
        args += ["--commits", str(their_commits.fileno()), "--supervisor", str(os.getpid())]
        args += [f"--listen={name}={sock.fileno()}" for name, sock in listening.items()]
        fds = [theirs.fileno(), their_orders.fileno(), their_commits.fileno()]
        fds += [s.fileno() for s in listening.values()]
        try:
            proc = await asyncio.create_subprocess_exec(*args, pass_fds=fds, stdin=asyncio.subprocess.DEVNULL)
        finally:
            for sock in (theirs, their_orders, their_commits):
                sock.close()
        mine.setblocking(False)
        mine.send(pickle.dumps(self._settings()))
        orders.setblocking(False)
        worker = _Worker(proc, mine, orders, time.monotonic())
        self._workers.append(worker)
        worker.tasks = [
            asyncio.create_task(self._serve(worker), name=f"worker-{proc.pid}-requests"),
            asyncio.create_task(self._commits(worker, commits), name=f"worker-{proc.pid}-commits"),
            asyncio.create_task(self._watch(worker), name=f"worker-{proc.pid}-exit"),
        ]
        log.info("ingress worker %d started", proc.pid)
        return worker

    async def _until_ready(self, worker: _Worker) -> None:
        exited = asyncio.ensure_future(worker.proc.wait())
        ready = asyncio.ensure_future(worker.ready.wait())
        try:
            await asyncio.wait({exited, ready}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            ready.cancel()
        if not worker.ready.is_set():
            log.error(
                "ingress worker %d did not start (exit status %s)", worker.proc.pid, worker.proc.returncode
            )

    async def _watch(self, worker: _Worker) -> None:
        code = await worker.proc.wait()
        self._forget(worker)
        if worker.stopping or self._closing:
            log.info("ingress worker %d stopped (exit status %d)", worker.proc.pid, code)
            return
        log.warning("ingress worker %d exited (status %d): replacing it", worker.proc.pid, code)
        with contextlib.suppress(Exception):  # its unfinished bodies; logged by the spool
            await self._recover()
        if time.monotonic() - worker.started < YOUNG:
            await asyncio.sleep(RESTART_PAUSE)
        if not self._closing:
            await self._until_ready(await self._spawn())

    def _forget(self, worker: _Worker) -> None:
        """What a gone worker held is given back: its connection slots and AUTH attempts under way."""
        if worker in self._workers:
            self._workers.remove(worker)
        ctx = self._context()
        for ip, n in worker.held.items():
            for _ in range(n):
                ctx.limiter.release(ip)
        for (ip, user), n in worker.verifying.items():
            for _ in range(n):
                ctx.guard.abandon(ip, user)
        worker.held.clear()
        worker.verifying.clear()
        worker.sock.close()
        worker.orders.close()

    @staticmethod
    def _signal_stop(workers: list[_Worker]) -> None:
        """SIGTERM, once, to each worker not yet told (``signal_stop`` then ``stop`` tell each once)."""
        for w in workers:
            if w.stopping:
                continue
            w.stopping = True
            if w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)

    async def _stop_all(self, workers: list[_Worker], *, grace: float) -> None:
        self._signal_stop(workers)
        for w in workers:
            try:
                await asyncio.wait_for(w.proc.wait(), grace + STOP_MARGIN)
            except TimeoutError:
                log.error("ingress worker %d did not stop in %.0f s: killed", w.proc.pid, grace + STOP_MARGIN)
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()
        await asyncio.gather(*(t for w in workers for t in w.tasks), return_exceptions=True)

    # -- requests (ingress/shared.py) ------------------------------------------------------------------
    async def _serve(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        sock = worker.sock
        while True:
            try:
                data = await loop.sock_recv(sock, MAX_MESSAGE)
            except OSError:
                return
            if not data:
                return
            request = json.loads(data)
            try:
                reply = self._answer(worker, request[0], request[1:])
            except Exception:  # a bug: said, and a worker waiting gets an answer rather than none
                log.exception("ingress worker %d: request %r failed", worker.proc.pid, request[0])
                reply = None
            if request[0] in ASKED:
                try:
                    sock.send(json.dumps(reply).encode())
                except OSError:
                    return

    async def _commits(self, worker: _Worker, sock: socket.socket) -> None:
        """The worker's group commits (``ingress/shared.RemoteCommits``), written to the spool here."""
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        try:
            while True:
                header = await reader.readexactly(LENGTH_SIZE)
                rows, now, body_dir = pickle.loads(await reader.readexactly(length_of(header)))  # noqa: S301
                reply = b""
                try:
                    if self._commit is None:
                        raise SpoolError("this spool does not take commits from ingress workers")
                    await self._commit(rows, now, body_dir)
                except Exception as e:  # the worker answers the device 451 and says why
                    log.error("ingress worker %d: its messages cannot be committed: %s", worker.proc.pid, e)
                    reply = (str(e) or type(e).__name__).encode()
                writer.write(frame(reply))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    def _answer(self, worker: _Worker, op: str, args: list[Any]) -> Any:
        """The reply to one request (None for those only told: ``ASKED``)."""
        ctx = self._context()
        if op == "admit":
            reason = ctx.limiter.admit(args[0])
            if reason is None:
                worker.held[args[0]] += 1
            return reason
        if op == "release":
            if worker.held[args[0]] > 0:
                worker.held[args[0]] -= 1
                ctx.limiter.release(args[0])
            return None
        if op == "blocked":
            return ctx.guard.blocked(args[0], args[1])
        if op == "begin":
            ok = ctx.guard.begin(args[0], args[1])
            if ok:
                worker.verifying[(args[0], args[1])] += 1
            return ok
        if op in ("success", "failure"):
            worker.verifying[(args[0], args[1])] -= 1
            if op == "success":
                ctx.guard.success(args[0], args[1])
                return None
            return ctx.guard.failure(args[0], args[1])
        if op == "rate":
            return ctx.rates.reply(DeviceSettings(name=args[0], max_messages_per_minute=args[1]))
        if op == "accepted":
            ctx.rates.accepted(DeviceSettings(name=args[0], max_messages_per_minute=args[1]))
            return None
        if op == "refusal":
            ctx.metrics.refusal(args[0])
            return None
        if op == "counted":
            ctx.metrics.count_accepted(args[0], args[1])
            return None
        if op == "seen":
            self._activity().seen(args[0], address=args[1], listener=args[2], tls_version=args[3])
            return None
        if op == "device_accepted":
            self._activity().accepted(args[0], address=args[1])
            return None
        if op == "device_refused":
            self._activity().refused(args[0], address=args[1], reply=args[2])
            return None
        if op == "queued":
            self._wake(args[0])
            return None
        if op == "route":
            return self._route_reply(args[0], args[1], args[2])
        if op == "ready":
            worker.ready.set()
            log.info("ingress worker %d accepting connections", worker.proc.pid)
            return None
        raise ValueError(f"unknown request {op!r}")
