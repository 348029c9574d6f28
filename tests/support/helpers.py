"""Helpers for the spool, delivery, durability, CLI and secrets tests: a controllable clock, a TOML
writer for subprocess configs, a ``relay365 serve`` subprocess, Postfix's ``smtp-sink`` as an upstream,
and bounded waits. Every peer listens on 127.0.0.1 with a kernel-chosen port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from relay365.spool.contract import QueueAdmin, Spool
from relay365.spool.model import QueueEntry, RcptState
from tests.support.relay import merge_sections

RELAY365 = [sys.executable, "-c", "from relay365.cli import main; main()"]
T0 = 1_800_000_000.0  # a fixed start for controllable clocks (2027-01-15)


class Clock:
    """A clock the test moves by hand: ``Relay(settings, clock=clock)``."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def free_port() -> int:
    """A port that was free a moment ago (for peers such as smtp-sink that cannot bind port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port() -> int:
    return free_port()


# -- TOML for subprocess configs ---------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        s = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def toml_dumps(data: dict[str, Any]) -> str:
    """Tables (dicts) and arrays of tables (lists of dicts) of scalar values: all a config needs."""
    out: list[str] = []
    for name, section in data.items():
        items = section if isinstance(section, list) else [section]
        for item in items:
            out.append(f"[[{name}]]" if isinstance(section, list) else f"[{name}]")
            out += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
            out.append("")
    return "\n".join(out)


def config_data(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """The same defaults as ``make_settings`` (relay.py), as a dict to write to a file."""
    data: dict[str, Any] = {
        "server": {
            "hostname": "relay.test",
            "spool_dir": str(tmp_path / "spool"),
            "auth_failure_delay": 0.0,
        },
        "listener": [{"name": "lan", "port": 0, "tls": "starttls"}],
        "device": [{"name": "local", "ip_allow": ["127.0.0.0/8"]}],
        "delivery": {"min_backoff": 60, "max_backoff": 600, "poll_interval": 0.2},
    }
    return merge_sections(data, sections)


def write_config(tmp_path: Path, name: str = "relay365.toml", **sections: Any) -> Path:
    path = tmp_path / name
    path.write_text(toml_dumps(config_data(tmp_path, **sections)), encoding="utf-8")
    return path


def run_cli(
    *args: str, stdin: str | None = None, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # rich wraps tables and lines at 80 columns otherwise
    env = {**os.environ, "COLUMNS": "400", **(env or {})}
    return subprocess.run(
        [*RELAY365, *args], input=stdin, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


# -- relay365 serve as a subprocess ------------------------------------------------------------------
_LISTENING = re.compile(r"relay365 listening: (\S+) on [0-9.]+:(\d+)")


@dataclass
class ServeProcess:
    config: Path
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    ports: dict[str, int] = field(default_factory=dict)

    def start(self, timeout: float = 30.0) -> ServeProcess:
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [*RELAY365, "serve", "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env,
            )
        finally:
            log.close()
        # serve prints one "relay365 listening" line per listener, one after the other: wait for all
        listeners = len(tomllib.loads(self.config.read_text(encoding="utf-8")).get("listener", [])) or 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = dict(_LISTENING.findall(self.log_text()))
            if len(found) >= listeners:
                self.ports = {k: int(v) for k, v in found.items()}
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay365 serve exited {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"relay365 serve did not start:\n{self.log_text()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@contextlib.contextmanager
def serving(config: Path, log_path: Path, env: dict[str, str] | None = None) -> Iterator[ServeProcess]:
    server = ServeProcess(config, log_path, env).start()
    try:
        yield server
    finally:
        server.kill()


# -- Postfix smtp-sink as an upstream ----------------------------------------------------------------
@dataclass
class SmtpSink:
    """``smtp-sink`` on 127.0.0.1 with fault options (-f/-r/-q/-Q ...), dumping each message to a file.

    As root smtp-sink drops to ``nobody``, so the dump directory sits directly under /tmp (the test's
    tmp_path is root-only) and is removed by ``stop``."""

    options: tuple[str, ...] = ()
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    dump_dir: Path | None = None

    def start(self, timeout: float = 10.0) -> SmtpSink:
        self.port = self.port or free_port()
        self.dump_dir = Path(tempfile.mkdtemp(prefix="relay365-sink-"))
        os.chmod(self.dump_dir, 0o777)
        self.proc = subprocess.Popen(
            ["smtp-sink", *(["-u", "nobody"] if os.geteuid() == 0 else []), "-d", f"{self.dump_dir}/%M.",
             *self.options,
             f"127.0.0.1:{self.port}", "64"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1) as s:
                s.recv(100)
                return self
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                self.stop()
                raise RuntimeError(f"smtp-sink exited: {err}")
            time.sleep(0.05)
        self.stop()
        raise TimeoutError("smtp-sink did not start")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                self.proc.wait(10)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            self.proc = None
        if self.dump_dir is not None:
            shutil.rmtree(self.dump_dir, ignore_errors=True)
            self.dump_dir = None

    def dumps(self) -> list[bytes]:
        if self.dump_dir is None:
            return []
        return [p.read_bytes() for p in sorted(self.dump_dir.rglob("*")) if p.is_file()]


@contextlib.contextmanager
def smtp_sink(*options: str, port: int = 0) -> Iterator[SmtpSink]:
    sink = SmtpSink(tuple(options), port).start()
    try:
        yield sink
    finally:
        sink.stop()


# -- devices and waits -------------------------------------------------------------------------------
def send_message(
    port: int,
    *,
    mail_from: str = "scanner@contoso.com",
    rcpts: tuple[str, ...] = ("alice@contoso.com",),
    body: bytes = b"Subject: scan\r\n\r\nhello\r\n",
    starttls: bool = False,
) -> str:
    """One message from a device (smtplib); returns the queue id from the 250 reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.ehlo("printer.lan")
        if starttls:
            import ssl

            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            s.starttls(context=ctx)
            s.ehlo("printer.lan")
        s.mail(mail_from)
        for r in rcpts:
            code, reply = s.rcpt(r)
            assert code == 250, (code, reply)
        code, reply = s.data(body)
        assert code == 250, (code, reply)
        return reply.split()[-1].decode()


def wait_for(check: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    """Blocking: poll ``check`` until it is true (``TimeoutError`` after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)


async def wait_state(
    spool: QueueAdmin, queue_id: str, rcpt: str, state: RcptState, timeout: float = 10.0
) -> QueueEntry:
    """Wait until ``rcpt`` of ``queue_id`` is in ``state``; return the entry."""
    found: list[QueueEntry] = []

    async def check() -> bool:
        entry = await spool.get(queue_id)
        found[:] = [entry]
        return any(r.rcpt == rcpt and r.state is state for r in entry.recipients)

    await wait_until(check, timeout, f"{queue_id} {rcpt} -> {state}")
    return found[0]


async def wait_gone(spool: QueueAdmin, queue_id: str, timeout: float = 10.0) -> None:
    async def check() -> bool:
        return all(e.queue_id != queue_id for e in await spool.list())

    await wait_until(check, timeout, f"{queue_id} to leave the queue")


async def body_of(spool: Spool, entry: QueueEntry) -> bytes:
    """A queued message's bytes, read through the spool as delivery reads them."""
    async with spool.body(entry) as reader:
        return await reader.read_all()


def body_files(messages_dir: Path) -> list[str]:
    """The names of the message files under a SQLite spool's messages/ (any owner's directory)."""
    return sorted(p.name for p in messages_dir.rglob("*") if p.is_file())


def spool_files(spool_dir: Path) -> list[Path]:
    return sorted(p for p in spool_dir.rglob("*") if p.is_file())


def smarthost_cfg(port: int, **extra: Any) -> dict[str, Any]:
    """A smart host transport section (plain SMTP to 127.0.0.1:port) for a config file."""
    return {"name": "up", "type": "smarthost", "host": "127.0.0.1", "port": port, "tls": "none", **extra}


# -- certificates for reload tests ---------------------------------------------------------------------
def issue_pair(ca: trustme.CA, directory: Path) -> tuple[Path, Path]:
    """A certificate for relay.test / 127.0.0.1 from ``ca`` and its key (0600), written to
    ``directory/relay.crt`` and ``relay.key`` (again: renewed in place, as certbot does)."""
    leaf = ca.issue_cert("relay.test", "127.0.0.1")
    cert, key = directory / "relay.crt", directory / "relay.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return cert, key


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts only ``ca`` (no host name check: the tests dial 127.0.0.1)."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.check_hostname = False
    return ctx
