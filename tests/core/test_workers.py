"""Ingress worker processes (issue 11, ``[server] workers``): ``relay365 serve`` as a subprocess with
``workers = 2``, the supervisor and one worker sharing the listening socket.

Which process accepts a connection is the kernel's choice; the tests make it theirs by stopping one
process (SIGSTOP): a stopped process does not accept, so the other one takes the connection. A worker
stopped while the supervisor answers nothing waits for it: the limits are asked of the supervisor,
never guessed.

* a per-IP cap of N is N over both processes, not N per process;
* an address blocked after AUTH failures on one process is blocked on the other (before any password);
* a worker killed with SIGKILL under load is replaced and every message it acknowledged is delivered;
* SIGTERM drains every process: 421 to idle sessions, a message in DATA finished and queued.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import pickle
import signal
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from relay365.credentials import hash_password
from relay365.errors import SpoolCommitUnknown, SpoolIOError
from relay365.ingress.shared import LENGTH_SIZE, RemoteCommits, length_of
from relay365.spool.model import Envelope, new_owner_id
from relay365.spool.sqlite import SqliteSpool
from tests.core.test_admin import samples
from tests.core.test_shutdown import GOODBYE, queued_ids, rest
from tests.support import (
    RawSMTP,
    ServeProcess,
    SmtpSink,
    body_files,
    body_of,
    closed_port,
    free_port,
    smarthost_cfg,
    smtp_sink,
    wait_for,
    write_config,
)

PLAIN = {"name": "lan", "port": 0, "tls": "none", "allow_plaintext_auth": True}


def workers_of(server: ServeProcess) -> list[int]:
    """The pids of the ingress workers of ``server`` (its child processes running the worker module)."""
    out = subprocess.run(
        ["ps", "--ppid", str(server.pid), "-o", "pid=,args="], capture_output=True, text=True
    )
    return [int(line.split()[0]) for line in out.stdout.splitlines() if "relay365.service.worker" in line]


def one_worker(server: ServeProcess) -> int:
    wait_for(lambda: len(workers_of(server)) == 1, what="the ingress worker")
    [pid] = workers_of(server)
    return pid


def backlog(port: int) -> int:
    """Connections waiting in the listening socket's accept queue (``ss``: Recv-Q of a listener)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True)
    return sum(int(line.split()[1]) for line in out.stdout.splitlines())


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def connect_to(port: int, accepted_by: int, stop: int) -> RawSMTP:
    """A connection accepted by the process ``accepted_by``: ``stop`` (the other one) is stopped until
    the connection has left the accept queue."""
    with stopped(stop):
        c = await RawSMTP.connect(port)
        await asyncio.to_thread(wait_for, lambda: backlog(port) == 0, 30.0, "the connection to be accepted")
    return c


async def test_a_per_ip_cap_of_n_is_n_across_workers(tmp_path: Path) -> None:
    cap = 3
    cfg = write_config(
        tmp_path,
        listener=[PLAIN],
        transport=[smarthost_cfg(closed_port())],
        server={"workers": 2, "max_connections_per_ip": cap},
    )
    server = ServeProcess(cfg, tmp_path / "serve.log").start()
    try:
        port, worker = server.ports["lan"], one_worker(server)
        # the first N on the supervisor, then one more on the worker; then the other way round
        held = [await connect_to(port, server.pid, stop=worker) for _ in range(cap)]
        for c in held:
            assert (await c.reply()).startswith("220")
        extra = await connect_to(port, worker, stop=server.pid)
        assert (await extra.reply()).startswith("421 4.7.0"), "the worker let a connection past the cap"
        assert await extra.closed()
        await extra.close()
        await held.pop().close()
        deadline = time.monotonic() + 30
        while True:  # (the supervisor sees the close on its own time: until then the cap is full)
            on_worker = [await connect_to(port, worker, stop=server.pid)]
            greeting = await on_worker[0].reply()
            if not greeting.startswith("421") or time.monotonic() > deadline:
                break
            await on_worker[0].close()
            await asyncio.sleep(0.1)
        assert greeting.startswith("220"), greeting
        refused = await connect_to(port, server.pid, stop=worker)
        assert (await refused.reply()).startswith("421 4.7.0"), "the supervisor ignored the worker's slot"
        for c in [*held, *on_worker, refused]:
            await c.close()
    finally:
        server.kill()


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def test_an_auth_block_holds_across_workers(tmp_path: Path) -> None:
    password = "printer-Secret-7"
    cfg = write_config(
        tmp_path,
        listener=[PLAIN],
        transport=[smarthost_cfg(closed_port())],
        server={"workers": 2, "auth_failures_before_block": 2, "auth_block_seconds": 300.0},
        device=[{"name": "printer", "password_hash": hash_password(password)}],
    )
    server = ServeProcess(cfg, tmp_path / "serve.log").start()
    try:
        port, worker = server.ports["lan"], one_worker(server)
        guesser = await connect_to(port, server.pid, stop=worker)
        assert (await guesser.reply()).startswith("220")
        assert (await guesser.cmd("EHLO attacker")).startswith("250")
        for guess in ("wrong-1", "wrong-2"):
            assert (await guesser.cmd(plain("printer", guess))).startswith("535 5.7.8")
        # On the worker: blocked before the password is looked at, even the right one.
        other = await connect_to(port, worker, stop=server.pid)
        assert (await other.reply()).startswith("220")
        assert (await other.cmd("EHLO printer")).startswith("250")
        assert (await other.cmd(plain("printer", password))).startswith("454 4.7.0")
        for c in (guesser, other):
            await c.close()
    finally:
        server.kill()


def send_until(port: int, stop: threading.Event, acked: list[str]) -> None:
    """Messages over new connections, one after the other, until ``stop``; the Message-IDs acknowledged."""
    n = 0
    while not stop.is_set():
        n += 1
        mid = f"<load-{n}@test>"
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
                s.sendmail("scan@contoso.com", ["bob@contoso.com"], f"Message-ID: {mid}\r\n\r\nbody {n}\r\n")
        except (smtplib.SMTPException, OSError):
            continue  # the worker died under this session: not acknowledged, the device sends again
        acked.append(mid)


async def test_a_worker_killed_under_load_is_replaced_and_loses_nothing_it_acknowledged(
    tmp_path: Path,
) -> None:
    with smtp_sink() as sink:
        cfg = write_config(
            tmp_path,
            listener=[{"name": "lan", "port": 0, "tls": "none"}],
            transport=[smarthost_cfg(sink.port)],
            server={"workers": 2},
        )
        server = ServeProcess(cfg, tmp_path / "serve.log").start()
        try:
            port, worker = server.ports["lan"], one_worker(server)
            stop, acked = threading.Event(), list[str]()
            senders = [threading.Thread(target=send_until, args=(port, stop, acked)) for _ in range(4)]
            for t in senders:
                t.start()
            try:
                await asyncio.to_thread(wait_for, lambda: len(acked) >= 40, 60.0, "messages before the kill")
                os.kill(worker, signal.SIGKILL)
                await asyncio.to_thread(
                    wait_for, lambda: workers_of(server) not in ([], [worker]), 60.0, "a new worker"
                )
                before = len(acked)
                await asyncio.to_thread(wait_for, lambda: len(acked) >= before + 40, 60.0, "messages after")
            finally:
                stop.set()
                for t in senders:
                    t.join(60)
            [replacement] = workers_of(server)
            assert replacement != worker
            await asyncio.to_thread(
                wait_for, lambda: delivered(sink) >= set(acked), 60.0, "every acked message"
            )
            assert server.terminate() == 0
        finally:
            server.kill()
    assert f"ingress worker {worker} exited" in server.log_text()


def delivered(sink: SmtpSink) -> set[str]:
    out = set()
    for dump in sink.dumps():
        for line in dump.split(b"\n"):
            if line.lower().startswith(b"message-id:"):
                out.add(line.split(b":", 1)[1].strip().decode())
    return out


async def begin_data(c: RawSMTP) -> None:
    """A session in the middle of DATA (as ``test_shutdown.start_data``, on a given connection)."""
    assert (await c.reply()).startswith("220")
    assert (await c.cmd("EHLO printer.lan")).startswith("250")
    assert (await c.cmd("MAIL FROM:<scan@contoso.com>")).startswith("250")
    assert (await c.cmd("RCPT TO:<bob@contoso.com>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    await c.send(b"Subject: half\r\n\r\nfirst half\r\n")


async def test_sigterm_drains_every_worker(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        listener=[{"name": "lan", "port": 0, "tls": "none"}],
        transport=[smarthost_cfg(closed_port())],  # upstream down: the messages stay queued
        server={"workers": 2, "shutdown_grace": 30.0},
    )
    server = ServeProcess(cfg, tmp_path / "serve.log").start()
    try:
        port, worker = server.ports["lan"], one_worker(server)
        idle = {}
        busy = {}
        for pid, other in ((server.pid, worker), (worker, server.pid)):
            idle[pid] = await connect_to(port, pid, stop=other)
            assert (await idle[pid].reply()).startswith("220")
            assert (await idle[pid].cmd("EHLO printer.lan")).startswith("250")
            busy[pid] = await connect_to(port, pid, stop=other)
            await begin_data(busy[pid])
        os.kill(server.pid, signal.SIGTERM)
        for pid in idle:
            assert await rest(idle[pid]) == GOODBYE + "\r\n", f"process {pid} did not say 421"
        queue_ids = []
        for pid in busy:
            await busy[pid].send(b"second half\r\n.\r\n")
            lines = (await rest(busy[pid])).splitlines()
            assert len(lines) == 2 and lines[0].startswith("250 2.0.0 Ok: queued as "), (pid, lines)
            assert lines[1] == GOODBYE
            queue_ids.append(lines[0].split()[-1])
        assert await asyncio.to_thread(server.proc.wait, 60) == 0  # type: ignore[union-attr]
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, 0)
            raise AssertionError("the worker outlived the supervisor")
        assert sorted(await queued_ids(tmp_path / "spool")) == sorted(queue_ids)
        for c in [*idle.values(), *busy.values()]:
            await c.close()
    finally:
        server.kill()


def barrage(pid: int, until: threading.Event) -> int:
    """SIGTERM to ``pid`` every 2 ms until ``until`` or the process is gone; how many were sent."""
    sent = 0
    while not until.is_set():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            break
        sent += 1
        time.sleep(0.002)
    return sent


async def test_a_stopping_worker_ignores_more_sigterms_and_exits_cleanly(tmp_path: Path) -> None:
    """SIGTERM after SIGTERM while a worker drains (an admin's ``kill``, or the supervisor, which used
    to send two) changes nothing: the message in DATA is still queued, the worker exits 0 and nothing but
    log lines reach the log. Before, one arriving while the worker's loop closed printed a traceback
    ("Exception ignored ... signal wakeup fd ... Bad file descriptor") into the log, or killed it (-15)."""
    cfg = write_config(
        tmp_path,
        listener=[{"name": "lan", "port": 0, "tls": "none"}],
        transport=[smarthost_cfg(closed_port())],
        server={"workers": 2, "shutdown_grace": 30.0},
    )
    log_path = tmp_path / "serve.log"
    server = ServeProcess(cfg, log_path).start()
    try:
        port, worker = server.ports["lan"], one_worker(server)
        c = await connect_to(port, worker, stop=server.pid)
        await begin_data(c)
        os.kill(server.pid, signal.SIGTERM)
        stopping = f"worker {worker} stopping"
        await asyncio.to_thread(
            wait_for, lambda: stopping in log_path.read_text(), 30.0, "the worker to stop"
        )
        done = threading.Event()
        sending = asyncio.create_task(asyncio.to_thread(barrage, worker, done))
        await asyncio.sleep(0.2)  # signals while it drains, then while it finishes
        await c.send(b"second half\r\n.\r\n")
        lines = (await rest(c)).splitlines()
        assert lines[0].startswith("250 2.0.0 Ok: queued as "), lines
        assert await asyncio.to_thread(server.proc.wait, 60) == 0  # type: ignore[union-attr]
        done.set()
        assert await sending > 50
        await c.close()
    finally:
        server.kill()
    log = log_path.read_text()
    assert f"ingress worker {worker} stopped (exit status 0)" in log, log
    assert "Traceback" not in log and "Exception ignored" not in log, log
    assert await queued_ids(tmp_path / "spool") == [lines[0].split()[-1]]


async def send_on(c: RawSMTP, subject: str) -> str:
    assert (await c.cmd("MAIL FROM:<scan@contoso.com>")).startswith("250")
    assert (await c.cmd("RCPT TO:<bob@contoso.com>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    return await c.cmd(f"Subject: {subject}\r\n\r\nbody\r\n.")


async def test_metrics_and_device_activity_count_every_worker(tmp_path: Path) -> None:
    """``/metrics`` is the supervisor's, and counts what the worker accepted, refused and holds open."""
    admin = free_port()
    cfg = write_config(
        tmp_path,
        listener=[PLAIN],
        transport=[smarthost_cfg(closed_port())],
        server={"workers": 2},
        admin={"port": admin, "tls": False},
    )
    server = ServeProcess(cfg, tmp_path / "serve.log").start()
    try:
        port, worker = server.ports["lan"], one_worker(server)
        sessions = {}
        for pid, other in ((server.pid, worker), (worker, server.pid)):
            c = sessions[pid] = await connect_to(port, pid, stop=other)
            assert (await c.reply()).startswith("220")
            assert (await c.cmd("EHLO printer.lan")).startswith("250")
        for n, pid in enumerate((server.pid, worker, worker)):
            assert (await send_on(sessions[pid], f"m{n}")).startswith("250 2.0.0 Ok: queued")
        assert (await sessions[worker].cmd("RCPT TO:<bob@contoso.com>")).startswith("503")
        accepted = ("relay365_messages_accepted_total", (("device", "local"), ("listener", "lan")))
        base = f"http://127.0.0.1:{admin}"
        async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=10) as http:
            deadline = time.monotonic() + 30
            while True:  # what the worker tells the supervisor is on its way (no reply is awaited)
                reply = await http.get("/metrics")
                assert reply.status_code == 200, reply.text
                got = samples(reply.text)
                if got.get(accepted) == 3.0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
        assert got[accepted] == 3.0
        assert got[("relay365_smtp_refusals_total", (("code", "503"), ("status", "5.5.1")))] == 1.0
        assert got[("relay365_connections", ())] == 2.0
        for c in sessions.values():
            await c.close()
    finally:
        server.kill()


async def test_a_reload_reaches_the_workers_and_their_open_sessions_go_on(tmp_path: Path) -> None:
    """SIGHUP: the worker applies the new settings as the supervisor does: a session open on it goes on
    and follows the new device table from its next MAIL; a listener the reload adds is served by it."""
    sections = {"listener": [PLAIN], "transport": [smarthost_cfg(closed_port())], "server": {"workers": 2}}
    cfg = write_config(tmp_path, **sections)
    server = ServeProcess(cfg, tmp_path / "serve.log").start()
    try:
        port, worker = server.ports["lan"], one_worker(server)
        session = await connect_to(port, worker, stop=server.pid)
        assert (await session.reply()).startswith("220")
        assert (await session.cmd("EHLO printer.lan")).startswith("250")
        assert (await send_on(session, "before")).startswith("250 2.0.0 Ok: queued")
        # 127.0.0.1 is no longer a device (sessions must log in), and a second listener
        second = {**PLAIN, "name": "second", "port": free_port()}
        sections["listener"] = [PLAIN, second]
        write_config(tmp_path, **sections, device=[{"name": "other", "ip_allow": ["192.0.2.0/24"]}])
        os.kill(server.pid, signal.SIGHUP)
        await asyncio.to_thread(
            wait_for, lambda: f"worker {worker} reloaded" in server.log_text(), 60.0, "the worker's reload"
        )
        assert workers_of(server) == [worker]
        assert (await session.cmd("MAIL FROM:<scan@contoso.com>")).startswith("530"), "the old devices"
        fresh = await connect_to(second["port"], worker, stop=server.pid)  # the new listener, on the worker
        assert (await fresh.reply()).startswith("220")
        for c in (session, fresh):
            await c.close()
        assert server.terminate() == 0
    finally:
        server.kill()


async def test_a_supervisor_killed_takes_its_workers_with_it(tmp_path: Path) -> None:
    """kill -9 of ``serve`` is a crash of the whole relay (a worker cannot commit without it): the worker
    is killed too, so the next start recovers the spool as after any crash (test_durability's kill -9
    test, which runs with the default workers, checks that nothing acknowledged is lost)."""
    cfg = write_config(
        tmp_path, listener=[PLAIN], transport=[smarthost_cfg(closed_port())], server={"workers": 2}
    )
    server = ServeProcess(cfg, tmp_path / "serve.log").start()
    try:
        worker = one_worker(server)
        server.kill()

        def gone() -> bool:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                return True
            try:
                stat = Path(f"/proc/{worker}/stat").read_text(encoding="ascii", errors="replace")
            except FileNotFoundError:
                return True
            return stat.rsplit(")", 1)[-1].split()[0] == "Z"  # (exited; its new parent reaps it)

        await asyncio.to_thread(wait_for, gone, 30.0, "the worker to die with its supervisor")
    finally:
        server.kill()


async def test_a_commit_the_supervisor_refuses_fails_that_message_only(tmp_path: Path) -> None:
    """A worker's group commit that the supervisor cannot write (its spool full or gone) fails those
    messages with the spool's error (the device gets 451 and sends again), and the next commit runs."""
    spool = SqliteSpool(tmp_path / "spool")
    await spool.open()
    answers = [SpoolIOError("the supervisor cannot commit the message: its spool is closed"), None]
    committed: list[str] = []

    def commit(rows: list[tuple[str, Envelope, int]], now: float, body_dir: str) -> None:
        answer = answers.pop(0)
        if answer is not None:
            raise answer
        committed.extend(q for q, _, _ in rows)

    spool.delegate_commits(commit)
    env = Envelope("scan@contoso.com", ("bob@contoso.com",), device="local")
    try:
        with pytest.raises(SpoolIOError, match="spool is closed"):
            await asyncio.wait_for(spool.enqueue(env, b"Subject: one\r\n\r\nx\r\n"), 30)
        queue_id = await asyncio.wait_for(spool.enqueue(env, b"Subject: two\r\n\r\nx\r\n"), 30)
        assert committed == [queue_id]
    finally:
        await spool.close()


@pytest.mark.parametrize("commits", [True, False], ids=["committed", "not-committed"])
async def test_a_supervisor_gone_mid_commit_leaves_the_body_to_recovery(
    tmp_path: Path, commits: bool
) -> None:
    """The supervisor had a worker's rows and went away before it answered (kill -9), having committed
    them or not: the worker cannot know. It used to remove the bodies, so a committed row could be left
    without its body ("cannot read message file", seen once in the kill -9 durability test). Now the
    device gets the spool's error (451), the body stays, and recovery, once the worker is gone too, keeps
    the body of a committed row and removes the one that has no row."""
    supervisor, worker = SqliteSpool(tmp_path / "spool"), SqliteSpool(tmp_path / "spool")
    await supervisor.open()
    await worker.open()
    theirs, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    worker.delegate_commits(RemoteCommits(theirs))
    body = b"Subject: half way\r\n\r\nx\r\n"

    async def dies_mid_commit() -> None:
        reader, writer = await asyncio.open_unix_connection(sock=mine)
        rows, now, body_dir = pickle.loads(
            await reader.readexactly(length_of(await reader.readexactly(LENGTH_SIZE)))
        )
        if commits:
            await supervisor.insert_delegated(rows, now, body_dir)
        writer.close()  # gone without an answer
        await writer.wait_closed()

    peer = asyncio.create_task(dies_mid_commit())
    env = Envelope("scan@contoso.com", ("bob@contoso.com",), device="local")
    try:
        with pytest.raises(SpoolCommitUnknown, match="went away while committing"):
            await asyncio.wait_for(worker.enqueue(env, body), 30)
        await peer
        [left] = body_files(tmp_path / "spool" / "messages")  # kept: its row may be there
    finally:
        await worker.close()  # the worker's end: its owner lock goes with it
        await supervisor.close()
        theirs.close()
    spool = SqliteSpool(tmp_path / "spool")
    await spool.open()
    try:
        await spool.recover(new_owner_id())
        entries = await spool.list()
        if commits:
            assert [e.queue_id for e in entries] == [left]
            assert (await body_of(spool, entries[0])).endswith(body)
            assert body_files(tmp_path / "spool" / "messages") == [left]
        else:
            assert entries == []
            assert body_files(tmp_path / "spool" / "messages") == []
    finally:
        await spool.close()
