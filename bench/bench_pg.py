#!/usr/bin/env python3
"""PostgreSQL spool benchmark (not a test; prints numbers), all in one run on this machine:

1. Accept rate and end-to-end rate of ``relay365 serve`` processes with the SQLite spool (1 node) and
   the PostgreSQL spool (1 node, 2 nodes on one database): N messages of 4 KB from device threads
   (spread over the nodes' listeners), upstream the sandbox's MX (Direct Send, no pacing). Accept:
   first connection to the last 250; end to end: to the last message stored in the sandbox mailbox.
2. Bodies: writing and reading a 35 MB body as rows of 256 KB chunks (``bodies``, what the spool
   uses) against a PostgreSQL large object written and read in the same 256 KB pieces.

The cluster is private (tests/pgcluster.py: initdb in a temp dir, loopback, a free port).

    python bench/bench_pg.py [--messages 1000] [--devices 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.pgcluster, tests.core.helpers

from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import example_tenant
from relay365.spool.pg_schema import migrate_url
from tests.core.helpers import ServeProcess, write_config
from tests.pgcluster import PostgresCluster

PASSWORD_ENV = "RELAY365_BENCH_PG_PASSWORD"
BODY = b"From: alice@contoso.test\r\nTo: bob@fabrikam.test\r\nSubject: bench\r\n\r\n" + b"x" * 4000 + b"\r\n"


def devices(ports: list[int], count: int, threads: int) -> None:
    lock = threading.Lock()
    left = [count]

    def device(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            while True:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                s.sendmail("alice@contoso.test", ["bob@fabrikam.test"], BODY)

    workers = [threading.Thread(target=device, args=(ports[i % len(ports)],)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


async def run_case(
    name: str, nodes: int, spool: dict[str, Any] | None, count: int, threads: int, env: dict[str, str]
) -> str:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        async with Sandbox(example_tenant(), state_dir=tmp / "sb") as sb:
            transport = {
                "name": "ds",
                "type": "direct_send",
                "host": "127.0.0.1",
                "port": sb.mx_port,
                "ca_file": str(sb.ca_path),
                "accepted_domains": ["contoso.test", "fabrikam.test"],
            }
            procs = []
            try:
                for n in range(nodes):
                    home = tmp / f"node{n}"
                    home.mkdir()
                    sections: dict[str, Any] = {
                        "server": {
                            "hostname": f"node{n}.bench",
                            "spool_dir": str(home / "var"),
                            "log_level": "WARNING",
                        },
                        "listener": [{"name": "lan", "port": 0, "tls": "none"}],
                        "transport": [transport],
                        "delivery": {"concurrency": 20, "poll_interval": 1},
                        "tracking": {"log_events": False},
                    }
                    if spool is not None:
                        sections["spool"] = spool
                    config = write_config(home, **sections)
                    procs.append(
                        ServeProcess(config, home / "serve.log", {**os.environ, **env}).start(timeout=60)
                    )
                start = time.monotonic()
                await asyncio.to_thread(devices, [p.ports["lan"] for p in procs], count, threads)
                accepted = time.monotonic()
                while len(sb.ctx.store.list(mailbox="bob@fabrikam.test")) < count:
                    if time.monotonic() - start > 900:
                        raise TimeoutError("not delivered in 15 minutes")
                    await asyncio.sleep(0.05)
                done = time.monotonic()
            finally:
                for p in procs:
                    p.terminate()
        return (
            f"{name:22s} {count} msgs: accept {count / (accepted - start):7.1f} msg/s,"
            f" end-to-end {count / (done - start):7.1f} msg/s"
        )


def rates(size: int, t0: float, t1: float, t2: float) -> str:
    return f"write {size / (t1 - t0) / 1e6:6.1f} MB/s, read {size / (t2 - t1) / 1e6:6.1f} MB/s"


def bodies(cluster: PostgresCluster, size: int = 35 * 1024 * 1024, chunk: int = 256 * 1024) -> list[str]:
    data = os.urandom(chunk)
    parts = size // chunk
    out = []
    with cluster.connect("bench") as conn:
        conn.autocommit = False
        conn.execute("SET synchronous_commit TO on")
        t0 = time.perf_counter()
        with conn.cursor() as cur:
            for seq in range(parts):
                cur.execute(
                    "INSERT INTO relay365.bodies (queue_id, seq, chunk) VALUES ('B', %s, %b)", (seq, data)
                )
        conn.commit()
        t1 = time.perf_counter()
        got = 0
        with conn.cursor(binary=True) as cur:
            for seq in range(parts):
                cur.execute("SELECT chunk FROM relay365.bodies WHERE queue_id = 'B' AND seq = %s", (seq,))
                row = cur.fetchone()
                assert row is not None
                got += len(row[0])
        conn.commit()
        t2 = time.perf_counter()
        assert got == size
        out.append(f"bodies: chunk table   {rates(size, t0, t1, t2)}")
        t0 = time.perf_counter()
        row = conn.execute("SELECT lo_create(0)").fetchone()
        assert row is not None
        oid = row[0]
        with conn.cursor() as cur:
            for seq in range(parts):
                cur.execute("SELECT lo_put(%s, %s, %b)", (oid, seq * chunk, data))
        conn.commit()
        t1 = time.perf_counter()
        got = 0
        with conn.cursor(binary=True) as cur:
            for seq in range(parts):
                cur.execute("SELECT lo_get(%s, %s, %s)", (oid, seq * chunk, chunk))
                row = cur.fetchone()
                assert row is not None
                got += len(row[0])
        conn.commit()
        t2 = time.perf_counter()
        assert got == size
        out.append(f"bodies: large object  {rates(size, t0, t1, t2)}")
    return out


async def main_async(count: int, threads: int) -> None:
    cluster = PostgresCluster()
    try:
        cluster.start()
        cluster.create_database("bench")
        migrate_url(cluster.url("bench"), password=cluster.password)
        for line in bodies(cluster):
            print(line, flush=True)
        env = {PASSWORD_ENV: cluster.password}
        pg_spool = {"url": cluster.url("bench"), "password_env": PASSWORD_ENV}
        print(await run_case("sqlite, 1 node", 1, None, count, threads, env), flush=True)
        with cluster.connect("bench") as conn:
            conn.execute("TRUNCATE relay365.bodies, relay365.tracking_events")
        print(await run_case("postgresql, 1 node", 1, pg_spool, count, threads, env), flush=True)
        print(await run_case("postgresql, 2 nodes", 2, pg_spool, count, threads, env), flush=True)
    finally:
        cluster.destroy()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(main_async(args.messages, args.devices))
    return 0


if __name__ == "__main__":
    sys.exit(main())
