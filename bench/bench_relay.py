#!/usr/bin/env python3
"""relay365 against a private Postfix on the same machine, in one run (issue 11's table).

Both servers relay to the same Postfix ``smtp-sink``: relay365 through a ``smarthost`` transport on a
plain listener, Postfix through ``relayhost``. Postfix's ``smtp-source`` sends with 10 sessions and a
new connection per message, 4 KB and 1 MB messages. For each size, ``--rounds`` rounds; in each round
the servers take turns (who goes first alternates), so a machine whose speed drifts treats both alike.
Per run:

* **accepted** msgs/s: messages / the time smtp-source took (every message got its ``250``);
* **end to end** msgs/s: messages / the time until the sink had received all of them;
* **CPU per message**: user + system time of the server's whole process tree (every process below
  the relay365 ``serve`` process, or below Postfix's ``master``, children that exited included, from
  /proc), from the start of the run until its queue is empty, divided by the messages.

The table shows the medians and the ratio relay365 / Postfix (the per-round ratios in brackets), then
memory: RSS and PSS summed over each process tree at rest, relay365's with ``--idle`` (1,000) idle
device connections open, and its peak.

    python bench/bench_relay.py [--rounds 3] [--small-count 2000] [--large-count 200] [--workers N]

Needs root for the private Postfix instance (``postfix -c DIR start``); if Postfix cannot be set up
the reason is printed and only relay365 is measured. ``--profile DIR`` runs relay365 under
``py-spy record`` (one flame graph per process and run) instead of comparing.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

FROM, TO = "bench@example.com", "archive@example.com"
LISTENING = re.compile(r"relay365 listening: lan on [0-9.]+:(\d+)")
QUEUE_DIRS = ("maildrop", "incoming", "active", "deferred", "hold")
TICKS = os.sysconf("SC_CLK_TCK")
SIZES = {"4 KB": 4096, "1 MB": 1 << 20}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- process trees from /proc ------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from "state" on (the name may hold spaces)


def tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(int(st[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def tree_cpu(root: int) -> float:
    """CPU seconds of the tree: each process's utime + stime, plus cutime + cstime (its children that
    exited and were reaped). A process that exits moves its time into its parent's cutime, so the
    difference of two readings counts every process that ran in between exactly once."""
    total = 0
    for pid in tree(root):
        st = _stat(pid)
        if st is not None:  # fields 14-17 of stat(5): utime stime cutime cstime
            total += sum(int(x) for x in st[11:15])
    return total / TICKS


def tree_memory(root: int) -> tuple[int, int, int]:
    """(RSS, PSS, peak RSS) in KiB, summed over the tree (PSS: shared pages split between sharers)."""
    rss = pss = peak = 0
    for pid in tree(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    peak += int(line.split()[1])
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return rss, pss, peak


# -- the sink ----------------------------------------------------------------------------------------
class Sink:
    """``smtp-sink -c``: counts every message it receives (``mesg=N`` after each ``.``)."""

    def __init__(self, base: Path) -> None:
        self.port = free_port()
        self.out = base / "sink.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                ["smtp-sink", "-c", "-u", "nobody", f"127.0.0.1:{self.port}", "1000"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1) as s:
                if s.recv(512).startswith(b"220"):
                    return
            time.sleep(0.05)
        raise RuntimeError("smtp-sink did not start")

    def received(self) -> int:
        with self.out.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 200))
            found = re.findall(rb"mesg=(\d+)", f.read())
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# -- relay365 ----------------------------------------------------------------------------------------
class Relay365:
    name = "relay365"

    def __init__(self, base: Path, *, upstream: int, workers: int | None, python: str) -> None:
        self.dir = base / "relay365"
        self.dir.mkdir()
        self.spool = self.dir / "spool"
        self.log = self.dir / "serve.log"
        self.upstream = upstream
        self.workers = workers
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def config(self) -> str:
        workers = "" if self.workers is None else f"workers = {self.workers}\n"
        return f"""[server]
hostname = "bench.local"
spool_dir = "{self.spool}"
log_level = "WARNING"
max_connections = 5000
max_connections_per_ip = 5000
{workers}
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
name = "sink"
type = "smarthost"
host = "127.0.0.1"
port = {self.upstream}
tls = "none"
"""

    def start(self, prefix: list[str] | None = None) -> None:
        config = self.dir / "relay365.toml"
        config.write_text(self.config())
        command = [self.python, "-c", "from relay365.cli import main; main()", "serve", "-c", str(config)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [*(prefix or []), *command], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 60
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
    def root(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def queued(self) -> int:
        with contextlib.closing(sqlite3.connect(self.spool / "queue.db", timeout=30)) as db:
            return int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    @contextlib.contextmanager
    def idle_connections(self, count: int) -> Iterator[int]:
        """Open ``count`` idle sessions (each greeted); yield how many were greeted."""
        socks: list[socket.socket] = []
        greeted = 0
        try:
            for _ in range(count):
                s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
                socks.append(s)
                if s.recv(512).startswith(b"220"):
                    greeted += 1
            time.sleep(1.0)
            yield greeted
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


# -- a private Postfix instance ----------------------------------------------------------------------
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

    name = "postfix"

    def __init__(self, base: Path, *, upstream: int) -> None:
        self.dir = base / "postfix"
        self.etc = self.dir / "etc"
        self.queue = self.dir / "queue"
        self.port = free_port()
        self.upstream = upstream
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
relayhost = [127.0.0.1]:{self.upstream}
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

    @property
    def root(self) -> int:
        """The master process: every Postfix daemon of this instance runs below it."""
        return int((self.queue / "pid" / "master.pid").read_text().split()[0])

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


# -- one run -----------------------------------------------------------------------------------------
@dataclass
class Run:
    server: str
    size: str
    messages: int
    accept_s: float = 0.0
    delivered_s: float = 0.0
    cpu_s: float = 0.0
    error: str = ""

    @property
    def accepted(self) -> float:
        return self.messages / self.accept_s if self.accept_s else 0.0

    @property
    def delivered(self) -> float:
        return self.messages / self.delivered_s if self.delivered_s else 0.0

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_s / self.messages


def smtp_source(port: int, *, size: int, count: int, sessions: int) -> str:
    """Run smtp-source; it aborts on the first unexpected reply, so exit 0 means all were accepted."""
    args = ["smtp-source", "-s", str(sessions), "-m", str(count), "-l", str(size),
            "-f", FROM, "-t", TO, f"127.0.0.1:{port}"]  # fmt: skip
    r = subprocess.run(args, capture_output=True, text=True, timeout=900, check=False)
    return "" if r.returncode == 0 else (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]


def wait_for(done: Callable[[], bool], limit: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + limit
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def measure(
    server: Relay365 | Postfix, sink: Sink, *, label: str, count: int, sessions: int, limit: float
) -> Run:
    run = Run(server.name, label, count)
    if not wait_for(lambda: server.queued() == 0, limit, 0.1):
        run.error = f"{server.queued()} messages still queued from an earlier run"
        return run
    received = sink.received()
    cpu = tree_cpu(server.root)
    start = time.monotonic()
    run.error = smtp_source(server.port, size=SIZES[label], count=count, sessions=sessions)
    run.accept_s = time.monotonic() - start
    if not wait_for(lambda: sink.received() - received >= count, limit):
        run.error = run.error or f"the sink got {sink.received() - received} of {count} messages"
    run.delivered_s = time.monotonic() - start
    if not wait_for(lambda: server.queued() == 0, limit):
        run.error = run.error or f"{server.queued()} messages still queued"
    run.cpu_s = tree_cpu(server.root) - cpu
    return run


# -- the report --------------------------------------------------------------------------------------
@dataclass
class Report:
    args: argparse.Namespace
    runs: list[Run] = field(default_factory=list)
    memory: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    idle: tuple[int, int, int, int] | None = None  # greeted, rss, pss, processes
    postfix_error: str = ""

    def of(self, server: str, label: str) -> list[Run]:
        return [r for r in self.runs if r.server == server and r.size == label]

    def print(self) -> None:
        a = self.args
        print(f"\nsmtp-source, {a.sessions} sessions, a new connection per message; both relay to smtp-sink")
        print(f"{'server':9} {'size':>5} {'msgs':>5} {'accept/s':>9} {'e2e/s':>8} {'CPU ms/msg':>11}  error")
        for r in self.runs:
            print(
                f"{r.server:9} {r.size:>5} {r.messages:>5} {r.accepted:>9.1f} {r.delivered:>8.1f}"
                f" {r.cpu_ms:>11.2f}  {r.error}"
            )
        if self.postfix_error:
            print(f"\nPostfix NOT measured: {self.postfix_error}")
        print(f"\nMedians of {a.rounds} rounds (per-round ratios in brackets):\n")
        print("| | relay365 | Postfix | ratio |\n|---|---|---|---|")
        for label in SIZES:
            ours, theirs = self.of("relay365", label), self.of("postfix", label)
            for what, key, unit, higher in (
                ("accepted, msgs/s", "accepted", "", True),
                ("delivered end to end, msgs/s", "delivered", "", True),
                ("server CPU per message (accept + deliver)", "cpu_ms", " ms", False),
            ):
                print(self._row(f"{label} {what}", ours, theirs, key, unit, higher))
        print()
        for name, (rss, pss, _peak) in self.memory.items():
            print(f"{name} at rest: RSS {rss / 1024:.1f} MiB, PSS {pss / 1024:.1f} MiB (whole process tree)")
        if self.idle is not None:
            greeted, rss, pss, procs = self.idle
            print(
                f"relay365 with {greeted}/{a.idle} idle connections: RSS {rss / 1024:.1f} MiB,"
                f" PSS {pss / 1024:.1f} MiB ({procs} processes)"
            )
        if "relay365 peak" in self.peaks:
            print(f"relay365 peak RSS (sum of VmHWM): {self.peaks['relay365 peak'] / 1024:.1f} MiB")

    peaks: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def _row(title: str, ours: list[Run], theirs: list[Run], key: str, unit: str, higher: bool) -> str:
        def med(runs: list[Run]) -> float:
            return statistics.median(getattr(r, key) for r in runs) if runs else 0.0

        a, b = med(ours), med(theirs)
        fmt = (lambda v: f"{v:.1f}{unit}") if key != "cpu_ms" else (lambda v: f"{v:.2f}{unit}")
        if not b:
            return f"| {title} | {fmt(a)} | - | - |"
        pairs = [
            getattr(x, key) / getattr(y, key) for x, y in zip(ours, theirs, strict=False) if getattr(y, key)
        ]
        spread = f" ({min(pairs):.2f}-{max(pairs):.2f})" if pairs else ""
        word = "x" if higher else "x the work"
        return f"| {title} | {fmt(a)} | {fmt(b)} | {a / b:.2f}{word}{spread} |"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small-count", type=int, default=2000)
    parser.add_argument("--large-count", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=int, default=1000, help="idle connections for the memory figure")
    parser.add_argument("--workers", type=int, default=None, help="[server] workers (default: unset)")
    parser.add_argument("--sizes", default="4 KB,1 MB", help="comma-separated: '4 KB', '1 MB'")
    parser.add_argument("--only", choices=["relay365", "postfix"], default=None)
    parser.add_argument("--python", default=sys.executable, help="the interpreter relay365 runs on")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy flame graphs into this folder")
    args = parser.parse_args()
    for tool in ("smtp-source", "smtp-sink"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (Debian package 'postfix')", file=sys.stderr)
            return 2
    labels = [s.strip() for s in args.sizes.split(",")]
    base = Path(tempfile.mkdtemp(prefix="relay365-bench-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    sink = Sink(base)
    relay = Relay365(base, upstream=sink.port, workers=args.workers, python=args.python)
    postfix = Postfix(base, upstream=sink.port)
    report = Report(args)
    profiler: subprocess.Popen[bytes] | None = None
    try:
        sink.start()
        servers: list[Relay365 | Postfix] = []
        if args.only != "postfix":
            relay.start()
            servers.append(relay)
        if args.only != "relay365":
            try:
                postfix.start()
                servers.append(postfix)
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                report.postfix_error = str(e)
        time.sleep(1.0)
        for s in servers:
            report.memory[s.name] = tree_memory(s.root)
        if args.profile is not None and args.only != "postfix":
            args.profile.mkdir(parents=True, exist_ok=True)
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            profiler = subprocess.Popen(
                [spy, "record", "--subprocesses", "--gil", "--rate", "250", "--format", "raw",
                 "-o", str(args.profile / "relay365.folded"), "--pid", str(relay.root)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)
        limit = 600.0
        for label in labels:
            count = args.small_count if SIZES[label] < (1 << 20) else args.large_count
            for rnd in range(args.rounds):
                for s in servers[:: 1 if rnd % 2 == 0 else -1]:
                    r = measure(s, sink, label=label, count=count, sessions=args.sessions, limit=limit)
                    report.runs.append(r)
                    print(
                        f"  {r.server:9} {r.size} round {rnd + 1}: accepted {r.accepted:.1f}/s,"
                        f" end to end {r.delivered:.1f}/s, {r.cpu_ms:.2f} ms CPU/msg {r.error}",
                        flush=True,
                    )
        if profiler is not None:
            profiler.send_signal(2)
            profiler.wait(60)
            profiler = None
        if relay.proc is not None:
            report.peaks["relay365 peak"] = tree_memory(relay.root)[2]
            with relay.idle_connections(args.idle) as greeted:
                rss, pss, _ = tree_memory(relay.root)
                report.idle = (greeted, rss, pss, len(tree(relay.root)))
    finally:
        if profiler is not None:
            profiler.kill()
        postfix.stop()
        relay.stop()
        sink.stop()
    report.print()
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
