#!/usr/bin/env python3
"""Ingress benchmark: Postfix's ``smtp-source`` against relay365 and against a private Postfix instance
with its durable queue, in the same run, on the same disk.

Both servers keep every accepted message queued: their upstream (relay365's smart host, Postfix's
relayhost) is a closed port on 127.0.0.1, so the numbers measure accept-and-fsync, not delivery.
Printed: accepted msgs/s for 4 KB and 1 MB messages at 10 concurrent sessions, relay365's peak RSS
(VmHWM) and its RSS with 1,000 idle connections.

    python bench/bench_ingress.py [--small-count 2000] [--large-count 200] [--sessions 10]

Needs root for the private Postfix instance (``postfix -c DIR start``); if Postfix cannot be set up
the reason is printed and only relay365 is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FROM, TO = "bench@example.com", "archive@example.com"
LISTENING = re.compile(r"relay365 listening: lan on [0-9.]+:(\d+)")
QUEUE_DIRS = ("maildrop", "incoming", "active", "deferred", "hold")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int, field: str) -> int:
    """A /proc/PID/status field in KiB (VmHWM = peak RSS, VmRSS = current RSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@dataclass
class Run:
    server: str
    size: int
    messages: int
    accepted: int
    seconds: float
    error: str = ""

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds > 0 else 0.0


def smtp_source(port: int, *, size: int, count: int, sessions: int) -> tuple[float, str]:
    """Run smtp-source; it aborts on the first unexpected reply, so exit 0 means all were accepted."""
    args = ["smtp-source", "-s", str(sessions), "-m", str(count), "-l", str(size),
            "-f", FROM, "-t", TO, f"127.0.0.1:{port}"]  # fmt: skip
    start = time.monotonic()
    r = subprocess.run(args, capture_output=True, text=True, timeout=900, check=False)
    elapsed = time.monotonic() - start
    error = "" if r.returncode == 0 else (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
    return elapsed, error


# -- relay365 --------------------------------------------------------------------------------------
class Relay365:
    def __init__(self, base: Path) -> None:
        self.dir = base / "relay365"
        self.dir.mkdir()
        self.spool = self.dir / "spool"
        self.log = self.dir / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        config = self.dir / "relay365.toml"
        config.write_text(
            f"""[server]
hostname = "bench.local"
spool_dir = "{self.spool}"
log_level = "WARNING"
max_connections = 5000
max_connections_per_ip = 5000

[[listener]]
name = "lan"
address = "127.0.0.1"
port = 0
tls = "none"
max_message_size = 20000000

[[device]]
name = "bench"
ip_allow = ["127.0.0.0/8"]

[[transport]]
name = "down"
type = "smarthost"
host = "127.0.0.1"
port = {free_port()}
tls = "none"

[delivery]
min_backoff = 3600
max_backoff = 4000
"""
        )
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from relay365.cli import main; main()", "serve", "-c", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = LISTENING.search(self.log.read_text(errors="replace"))
            if m:
                self.port = int(m.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"relay365 serve did not start:\n{self.log.read_text(errors='replace')}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def queued(self) -> int:
        with contextlib.closing(sqlite3.connect(self.spool / "queue.db", timeout=30)) as db:
            return int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    def idle_connections(self, count: int) -> tuple[int, int]:
        """Open ``count`` idle sessions (each greeted); return (greeted, VmRSS KiB while they are open)."""
        socks: list[socket.socket] = []
        greeted = 0
        try:
            for _ in range(count):
                s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
                socks.append(s)
                if s.recv(512).startswith(b"220"):
                    greeted += 1
            time.sleep(1.0)
            return greeted, proc_status(self.pid, "VmRSS")
        finally:
            for s in socks:
                s.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# -- a private Postfix instance ---------------------------------------------------------------------
MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """``postfix -c DIR``: its own main.cf/master.cf, queue and data directories under a temp dir."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "postfix"
        self.etc = self.dir / "etc"
        self.queue = self.dir / "queue"
        self.port = free_port()
        self.started = False

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.etc), *args], capture_output=True, text=True, timeout=120, check=False
        )

    def start(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("a private Postfix instance needs root (postfix start drops to 'postfix')")
        if shutil.which("postfix") is None:
            raise RuntimeError("postfix is not installed")
        self.etc.mkdir(parents=True)
        self.queue.mkdir()  # postfix creates the queue's subdirectories, not the queue directory
        (self.etc / "main.cf").write_text(
            f"""compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.dir / "data"}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = bench.local
mydomain = bench.local
myorigin = bench.local
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{free_port()}
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
message_size_limit = 20000000
alias_maps =
alias_database =
local_recipient_maps =
maillog_file = {self.dir / "maillog"}
maillog_file_prefixes = {self.dir}
syslog_name = postfix-bench
"""
        )
        (self.etc / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        r = self._postfix("start")
        if r.returncode != 0:
            raise RuntimeError(
                f"'postfix -c {self.etc} start' failed (exit {r.returncode}):"
                f" {(r.stderr or r.stdout).strip()} {self.maillog_tail()}"
            )
        self.started = True
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 2) as s:
                if s.recv(512).startswith(b"220"):
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the private Postfix does not answer on port {self.port}: {self.maillog_tail()}")

    def maillog_tail(self) -> str:
        log = self.dir / "maillog"
        return "\n".join(log.read_text(errors="replace").splitlines()[-5:]) if log.exists() else "(no log)"

    def queued(self) -> int:
        """Distinct queue ids (a file keeps its name when it moves from incoming to active to deferred;
        the directories are scanned in that order so a moving file is counted once)."""
        ids: set[str] = set()
        for d in QUEUE_DIRS:
            if (self.queue / d).is_dir():
                ids.update(p.name for p in (self.queue / d).rglob("*") if p.is_file())
        return len(ids)

    def stop(self) -> None:
        if self.started:
            self._postfix("stop")
            self.started = False


# -- the run ---------------------------------------------------------------------------------------
def measure(name: str, port: int, queued: Callable[[], int], *, size: int, count: int, sessions: int) -> Run:
    before = queued()
    seconds, error = smtp_source(port, size=size, count=count, sessions=sessions)
    return Run(name, size, count, queued() - before, seconds, error)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small-count", type=int, default=2000)
    parser.add_argument("--large-count", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per size; the servers alternate who goes first"
    )
    args = parser.parse_args()
    if shutil.which("smtp-source") is None:
        print("smtp-source not found (Debian package 'postfix')", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="relay365-bench-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    relay, postfix = Relay365(base), Postfix(base)
    runs: list[Run] = []
    postfix_error = ""
    try:
        relay.start()
        time.sleep(1.0)
        start_peak, start_rss = proc_status(relay.pid, "VmHWM"), proc_status(relay.pid, "VmRSS")
        try:
            postfix.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            postfix_error = str(e)
        servers = [("relay365", relay.port, relay.queued)]
        if not postfix_error:
            servers.append(("postfix", postfix.port, postfix.queued))
        # A virtual machine's speed drifts from minute to minute: interleave the servers, alternate
        # who goes first, and compare medians.
        for size, count in ((4096, args.small_count), (1024 * 1024, args.large_count)):
            for rnd in range(args.rounds):
                for name, port, queued in servers[:: 1 if rnd % 2 == 0 else -1]:
                    runs.append(measure(name, port, queued, size=size, count=count, sessions=args.sessions))
        peak = proc_status(relay.pid, "VmHWM")
        before_idle = proc_status(relay.pid, "VmRSS")
        greeted, idle_rss = relay.idle_connections(args.idle)
    finally:
        postfix.stop()
        relay.stop()

    print(f"\nsmtp-source, {args.sessions} concurrent sessions, one message per session; queues on {base}")
    print(f"{'server':10} {'size':>8} {'sent':>6} {'accepted':>9} {'seconds':>8} {'msgs/s':>9}  error")
    for r in runs:
        label = "4 KB" if r.size < 1 << 20 else "1 MB"
        row = f"{r.server:10} {label:>8} {r.messages:>6} {r.accepted:>9} {r.seconds:>8.2f} {r.rate:>9.1f}"
        print(f"{row}  {r.error}")
    if postfix_error:
        print(f"\nPostfix NOT measured: {postfix_error}")
    else:
        for label, size in (("4 KB", 4096), ("1 MB", 1 << 20)):
            ours = statistics.median(r.rate for r in runs if r.server == "relay365" and r.size == size)
            theirs = statistics.median(r.rate for r in runs if r.server == "postfix" and r.size == size)
            if theirs:
                print(
                    f"relay365 / postfix at {label}: {ours / theirs:.2f}x"
                    f" (median of {args.rounds}: {ours:.1f} vs {theirs:.1f} msgs/s)"
                )
    print(
        f"\nrelay365 peak RSS (VmHWM): {peak / 1024:.1f} MiB; at start, before any mail:"
        f" VmHWM {start_peak / 1024:.1f} MiB, VmRSS {start_rss / 1024:.1f} MiB"
    )
    print(f"relay365 RSS after the load: {before_idle / 1024:.1f} MiB")
    print(
        f"relay365 RSS with {greeted}/{args.idle} idle connections open: {idle_rss / 1024:.1f} MiB"
        f" ({(idle_rss - before_idle) / max(greeted, 1):.1f} KiB per connection)"
    )
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
