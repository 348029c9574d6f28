"""Console benchmark: the Queue page and trace searches with 100,000 queued messages.

Fills a fresh spool with N deferred messages (rows only: the pages never read bodies) and the
tracking log with 4 events per message (received, routed, attempted, deferred), starts the relay
with its console on 127.0.0.1, and times real HTTP requests (median and worst of --repeat runs).
The upstream is a closed port and every recipient waits a day, so nothing else runs meanwhile.

    python bench/bench_console.py [--messages 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from relay365.admin.accounts import AccountStore, Role
from relay365.observability.tracking import EventKind, TrackingEvent
from relay365.observability.tracking_sqlite import SqliteTrackingLog
from relay365.service.relay import Relay
from relay365.settings import parse_settings
from relay365.spool.model import Envelope, RcptState, new_queue_id
from relay365.spool.sqlite import SqliteSpool


def settings(state: Path) -> object:
    return parse_settings(
        {
            "server": {"hostname": "bench.test", "spool_dir": str(state / "spool")},
            "listener": [{"name": "lan", "port": 0, "tls": "none"}],
            "device": [{"name": "mfp", "ip_allow": ["127.0.0.0/8"]}],
            "transport": [{"name": "up", "type": "smarthost", "host": "127.0.0.1", "port": 9, "tls": "none"}],
            "delivery": {"min_backoff": 86400, "max_backoff": 86400, "poll_interval": 5},
            "admin": {"port": 0},
        },
        base=state,
    )


async def fill(state: Path, count: int) -> None:
    spool = SqliteSpool(state / "spool")
    await spool.open()
    tracking = SqliteTrackingLog(state / "spool" / "tracking.db", log_events=False)
    await tracking.open(purge_every=None)
    now = time.time()
    later = now + 86400
    reply = "451 4.7.500 Server busy. Please try again later."

    def rows(conn: object, batch: list[tuple[str, Envelope, int]]) -> None:
        import sqlite3

        assert isinstance(conn, sqlite3.Connection)
        conn.execute("BEGIN")
        SqliteSpool._insert_rows(conn, batch, now - 3600)
        conn.execute(
            f"UPDATE recipients SET state=?, attempts=1, next_attempt=?, last_reply=?, transport='up'"
            f" WHERE queue_id IN ({','.join('?' * len(batch))})",
            (RcptState.DEFERRED.value, later, reply, *(q for q, _, _ in batch)),
        )
        conn.execute("COMMIT")

    for start in range(0, count, 5000):
        batch = []
        for i in range(start, min(count, start + 5000)):
            qid = new_queue_id()
            env = Envelope(
                mail_from=f"scanner{i % 50}@contoso.com",
                rcpt_tos=(f"user{i}@{'fabrikam' if i % 10 == 0 else 'contoso'}.com",),
                device=f"mfp{i % 20}",
                peer="10.0.0.5",
                listener="lan",
                subject=f"Scan {i:06d} from floor {i % 7}",
                message_id=f"scan{i}@mfp",
            )
            batch.append((qid, env, 4096))
            for kind in (EventKind.RECEIVED, EventKind.ROUTED, EventKind.ATTEMPTED, EventKind.DEFERRED):
                tracking.record(
                    TrackingEvent(
                        kind=kind,
                        at=now - 3600 + i * 0.01,
                        queue_id=qid,
                        message_id=env.message_id,
                        subject=env.subject,
                        sender=env.mail_from,
                        recipient=env.rcpt_tos[0],
                        device=env.device,
                        transport="up" if kind is not EventKind.RECEIVED else "",
                        reply=reply if kind is EventKind.DEFERRED else "",
                    )
                )
        await spool._db(lambda conn, b=batch: rows(conn, b))  # type: ignore[misc]
    await tracking.flush()
    await tracking.close()
    await spool.close()


async def timed(http: httpx.AsyncClient, url: str, repeat: int) -> tuple[float, float, int]:
    times = []
    size = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = await http.get(url)
        times.append(time.perf_counter() - t0)
        assert r.status_code == 200, (url, r.status_code, r.text[:300])
        size = len(r.content)
    return statistics.median(times), max(times), size


async def main(count: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        t0 = time.perf_counter()
        await fill(state, count)
        took = time.perf_counter() - t0
        print(f"filled {count} queued messages and {4 * count} tracking events in {took:.1f}s")
        token = AccountStore(state / "spool" / "admin-users.json").create_token("bench", Role.VIEWER)
        relay = Relay(settings(state))  # type: ignore[arg-type]
        await relay.start()
        try:
            headers = {"authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(
                base_url=relay.admin_url, headers=headers, timeout=60, trust_env=False
            ) as http:
                deep = (await http.get("/api/queue", params={"limit": 500, "order": "oldest"})).json()[
                    "next_cursor"
                ]
                probes = [
                    ("Queue page (API, first 50)", "/api/queue"),
                    ("Queue: deferred to @fabrikam.com", "/api/queue?state=deferred&recipient=@fabrikam.com"),
                    ("Queue: device mfp7, older than 1h", "/api/queue?device=mfp7&min_age=1h"),
                    ("Queue: a page deep in the queue", f"/api/queue?order=oldest&cursor={deep}"),
                    ("Overview (API)", "/api/overview"),
                    ("Trace: one recipient", f"/api/trace?recipient=user{count // 2 + 1}@contoso.com"),
                    ("Trace: sender @domain", "/api/trace?sender=scanner7@contoso.com"),
                    ("Trace: subject substring", "/api/trace?subject=floor 3&limit=100"),
                    ("Trace: Message-ID", f"/api/trace?message_id=<scan{count // 3}@mfp>"),
                    (
                        "Trace: recipient @domain, last hour",
                        "/api/trace?recipient=@fabrikam.com&kind=deferred",
                    ),
                ]
                print(f"{'request':42} {'median':>9} {'worst':>9} {'bytes':>9}")
                for name, url in probes:
                    med, worst, size = await timed(http, url, repeat)
                    print(f"{name:42} {med * 1000:8.0f}ms {worst * 1000:8.0f}ms {size:9d}")
                # The HTML pages, through a session as a browser would.
                store = AccountStore(state / "spool" / "admin-users.json")
                store.set_password("bench", "bench-password", Role.VIEWER)
                async with httpx.AsyncClient(base_url=relay.admin_url, timeout=60, trust_env=False) as page:
                    await page.post("/login", data={"username": "bench", "password": "bench-password"})
                    for name, url in (
                        ("Queue page (HTML)", "/queue"),
                        (
                            "Queue page (HTML), deferred @fabrikam",
                            "/queue?state=deferred&recipient=@fabrikam.com",
                        ),
                        (
                            "Trace page (HTML), one recipient",
                            f"/trace?recipient=user{count // 2 + 1}@contoso.com",
                        ),
                        ("Overview page (HTML)", "/"),
                    ):
                        med, worst, size = await timed(page, url, repeat)
                        print(f"{name:42} {med * 1000:8.0f}ms {worst * 1000:8.0f}ms {size:9d}")
        finally:
            await relay.stop(grace=5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.repeat))
