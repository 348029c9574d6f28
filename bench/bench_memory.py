#!/usr/bin/env python3
"""relay365's memory (issue 11's goals): RSS and PSS summed over every relay365 process (``serve`` and
its ingress workers), for each ``[server] workers`` value asked for:

* at rest, after start;
* with ``--idle`` (1,000) idle device connections open (each greeted with 220);
* while ``--concurrent`` (50) messages of ``--size-mb`` (30) MB are received at once (each its own
  session, streamed; the highest sum seen, sampled every 50 ms), and the sum of the processes' peaks
  (VmHWM) after them.

The goals: 1,000 idle connections < 60 MB, 50 concurrent 30 MB messages < 300 MB.

    python bench/bench_memory.py [--workers 1,2] [--idle 1000] [--concurrent 50] [--size-mb 30]

relay365 delivers to an ``smtp-sink`` (Postfix's) through a ``smarthost`` transport, as in
``bench_relay.py``, whose process-tree readings (from /proc) this uses.
"""

from __future__ import annotations

import argparse
import shutil
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_relay import Relay365, Sink, tree, tree_memory

MIB = 1024.0


class BigRelay365(Relay365):
    """bench_relay's relay365, taking messages of up to 40 MB (Exchange Online's limit is 35 MB)."""

    def config(self) -> str:
        return super().config().replace("max_message_size = 20000000", "max_message_size = 41943040")


def big_message(size: int) -> bytes:
    line = b"x" * 998 + b"\r\n"
    head = b"From: bench@example.com\r\nTo: archive@example.com\r\nSubject: big\r\n\r\n"
    return head + line * (size // len(line))


def concurrent_peak(relay: Relay365, *, count: int, size: int) -> tuple[int, int, int, str]:
    """Send ``count`` messages of ``size`` bytes at once; (peak RSS sum, peak PSS sum, VmHWM sum, error)."""
    body = big_message(size)
    errors: list[str] = []
    barrier = threading.Barrier(count)

    def send() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=300) as s:
                barrier.wait(60)
                s.sendmail("bench@example.com", ["archive@example.com"], body)
        except (OSError, smtplib.SMTPException, threading.BrokenBarrierError) as e:
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=send) for _ in range(count)]
    for t in threads:
        t.start()
    peak_rss = peak_pss = 0
    while any(t.is_alive() for t in threads):
        rss, pss, _ = tree_memory(relay.root)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.05)
    for t in threads:
        t.join()
    hwm = tree_memory(relay.root)[2]
    return peak_rss, peak_pss, hwm, (f"{len(errors)} failed: {errors[0]}" if errors else "")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", default="1,2", help="comma-separated [server] workers values")
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--size-mb", type=int, default=30)
    parser.add_argument("--python", default=sys.executable, help="the interpreter relay365 runs on")
    args = parser.parse_args()
    if shutil.which("smtp-sink") is None:
        print("smtp-sink not found (Debian package 'postfix')", file=sys.stderr)
        return 2
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        base = Path(tempfile.mkdtemp(prefix="relay365-mem-", dir="/var/tmp"))
        base.chmod(0o755)
        sink = Sink(base)
        relay = BigRelay365(base, upstream=sink.port, workers=workers, python=args.python)
        try:
            sink.start()
            relay.start()
            time.sleep(2.0)  # (the workers are up: serve prints its listening line after them)
            rest = tree_memory(relay.root)
            with relay.idle_connections(args.idle) as greeted:
                idle = tree_memory(relay.root)
                processes = len(tree(relay.root))
            peak = concurrent_peak(relay, count=args.concurrent, size=args.size_mb << 20)
        finally:
            relay.stop()
            sink.stop()
            shutil.rmtree(base, ignore_errors=True)
        rows.append((workers, processes, rest, greeted, idle, peak))
    print(
        f"\nrelay365 memory, summed over its processes (MiB); {args.concurrent} x {args.size_mb} MB at once\n"
    )
    print("| workers | processes | at rest RSS / PSS | idle connections | idle RSS / PSS |"
          " concurrent peak RSS / PSS | sum of VmHWM | errors |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for workers, processes, rest, greeted, idle, (prss, ppss, hwm, error) in rows:
        print(
            f"| {workers} | {processes} | {rest[0] / MIB:.1f} / {rest[1] / MIB:.1f} | {greeted}/{args.idle} |"
            f" {idle[0] / MIB:.1f} / {idle[1] / MIB:.1f} | {prss / MIB:.1f} / {ppss / MIB:.1f} |"
            f" {hwm / MIB:.1f} | {error or '-'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
