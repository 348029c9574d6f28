"""The systemd notify protocol against a real ``NOTIFY_SOCKET`` datagram socket: ``relay365 serve`` as a
subprocess sends READY=1 only once every listener accepts connections, pings the watchdog, and sends
STOPPING=1 on SIGTERM; the Notifier itself (abstract sockets, WATCHDOG_PID, an unhealthy relay)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import smtplib
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from relay365.service.notify import Notifier, socket_address, watchdog_interval
from tests.support import RELAY365, closed_port, smarthost_cfg, write_config


@contextmanager
def notify_socket(tmp_path: Path, kind: str) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket as systemd makes it: (socket, NOTIFY_SOCKET value)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if kind == "path":
            path = str(tmp_path / "notify.sock")
            sock.bind(path)
            yield sock, path
        else:
            name = f"relay365-test-{uuid.uuid4().hex}"
            sock.bind("\0" + name)
            yield sock, "@" + name
    finally:
        sock.close()


def receive(sock: socket.socket, until: str, seen: list[str], timeout: float = 30.0) -> str:
    """Datagrams into ``seen`` until one contains the line ``until``; that one is returned."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {until} among {seen}")
        sock.settimeout(left)
        message = sock.recv(4096).decode()
        seen.append(message)
        if until in message.split("\n"):
            return message


def smtp_noop(port: int) -> int:
    """Connect (smtplib insists on a 220 greeting), then the reply code of NOOP."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        code, _ = s.noop()
        return code


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_serve_notifies_ready_watchdog_and_stopping(tmp_path: Path, kind: str) -> None:
    config = write_config(
        tmp_path,
        listener=[{"name": "lan", "port": 0, "tls": "starttls"}, {"name": "plain", "port": 0, "tls": "none"}],
        transport=[smarthost_cfg(closed_port())],
    )
    seen: list[str] = []
    with notify_socket(tmp_path, kind) as (sock, value):
        env = {**os.environ, "NOTIFY_SOCKET": value, "WATCHDOG_USEC": "400000"}
        env.pop("WATCHDOG_PID", None)
        log = (tmp_path / "serve.log").open("wb")
        proc = subprocess.Popen(
            [*RELAY365, "serve", "-c", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
        )
        log.close()
        try:
            ready = receive(sock, "READY=1", seen)
            # READY comes once: both listeners answer at that moment, and nothing said READY before.
            ports = dict(re.findall(r"(\w+) 127\.0\.0\.1:(\d+)", ready))
            assert sorted(ports) == ["lan", "plain"], ready
            assert [smtp_noop(int(p)) for p in ports.values()] == [250, 250]
            assert seen[0] == "STATUS=Starting: recovering the spool, opening the listeners"
            assert all("READY=1" not in m for m in seen[:-1])
            assert "STATUS=Accepting mail on lan 127.0.0.1:" in ready
            assert (tmp_path / "spool" / "queue.db").exists()

            # WATCHDOG_USEC=0.4s: a ping every 0.2s from the event loop.
            for _ in range(3):
                receive(sock, "WATCHDOG=1", seen)

            proc.send_signal(signal.SIGTERM)
            stopping = receive(sock, "STOPPING=1", seen)
            assert "STATUS=Stopping: no new connections, finishing in-flight messages" in stopping
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert "READY=1" not in "".join(seen[seen.index(ready) + 1 :])


def test_serve_without_notify_socket_runs_as_before(tmp_path: Path) -> None:
    """No NOTIFY_SOCKET (a terminal): nothing is sent, the relay starts and stops as always."""
    config = write_config(tmp_path, transport=[smarthost_cfg(closed_port())])
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    proc = subprocess.Popen(
        [*RELAY365, "serve", "-c", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = ""
        while "relay365 listening:" not in line:
            line = proc.stderr.readline()
            assert line, "relay365 serve ended before listening"
        assert "relay365 listening: lan on 127.0.0.1:" in line, line
        port = int(line.rsplit(":", 1)[1].split()[0])
        assert smtp_noop(port) == 250
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
        assert proc.returncode == 0, rest
        assert "cannot notify systemd" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_watchdog_interval_is_half_and_only_for_our_pid() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, 42) is None
    assert watchdog_interval({}, 42) is None
    assert socket_address("@relay") == "\0relay" and socket_address("/run/x") == "/run/x"
    # Without a socket the watchdog is off even when WATCHDOG_USEC is set.
    assert Notifier.from_environ({"WATCHDOG_USEC": "1000000"}).watchdog_interval is None


async def test_unhealthy_relay_triggers_the_watchdog_at_once(tmp_path: Path) -> None:
    seen: list[str] = []
    with notify_socket(tmp_path, "abstract") as (sock, value):
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "200000"})
        health = iter([True, True, False])
        try:
            await asyncio.wait_for(notifier.watchdog(healthy=lambda: next(health)), 30)
        finally:
            notifier.close()
        await asyncio.to_thread(receive, sock, "WATCHDOG=trigger", seen)
    assert seen[:2] == ["WATCHDOG=1", "WATCHDOG=1"]
    assert seen[2] == "WATCHDOG=trigger\nSTATUS=Unhealthy: delivery stopped; restarting"


async def test_unreachable_socket_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="relay365.service.notify")
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert notifier.enabled
    assert await notifier.ready("ready") is False
    assert await notifier.stopping("stopping") is False
    warnings = [r.getMessage() for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled is False
    assert await Notifier.from_environ({}).ready("x") is False


def drain(sock: socket.socket) -> list[str]:
    """Every datagram already queued on ``sock``."""
    sock.setblocking(False)
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_no_ready_when_a_listener_cannot_bind(tmp_path: Path) -> None:
    """A port already taken: serve exits with a clear error, systemd sees why in STATUS, never READY."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path,
            listener=[
                {"name": "lan", "port": 0, "tls": "none"},
                {"name": "busy", "port": port, "tls": "none"},
            ],
            transport=[smarthost_cfg(closed_port())],
        )
        with notify_socket(tmp_path, "path") as (sock, value):
            env = {**os.environ, "NOTIFY_SOCKET": value}
            r = subprocess.run(
                [*RELAY365, "serve", "-c", str(config)], capture_output=True, text=True, timeout=60, env=env,
                check=False,
            )  # fmt: skip
            seen = drain(sock)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and f"{port}" in r.stderr and "address already in use" in r.stderr
    assert seen[0] == "STATUS=Starting: recovering the spool, opening the listeners"
    assert seen[-1].startswith("STATUS=Failed to start: ") and f"{port}" in seen[-1], seen
    assert not any("READY=1" in m for m in seen)
