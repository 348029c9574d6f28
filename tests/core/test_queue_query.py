"""The queue at scale: 20,000 messages, filtered in SQL by ``SqliteSpool.query`` and its users
(``relay365 queue list|retry`` and ``/api/queue``)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from relay365.admin.accounts import AccountStore, Role
from relay365.spool.model import Envelope, QueueFilter, QueueState, RcptState
from relay365.spool.sqlite import SqliteSpool
from tests.support import (
    T0,
    Clock,
    closed_port,
    make_settings,
    run_cli,
    running_relay,
    smarthost,
    write_config,
)

COUNT = 20_000
BUSY = "451 4.7.500 Server busy. Please try again later"


@dataclass(frozen=True)
class Row:
    queue_id: str
    device: str
    sender: str
    rcpts: tuple[str, ...]
    deferred: bool
    held: bool


def rows(count: int) -> list[Row]:
    """A varied queue: ten printers, several senders, one in four messages with an outside
    recipient, one in five deferred, one in 97 on hold."""
    out = []
    for i in range(count):
        rcpts = (f"user{i % 50}@contoso.com",) + ((f"ext{i % 5}@partner.org",) if i % 4 == 0 else ())
        out.append(
            Row(
                queue_id=f"{i:011X}{i:08X}",
                device=f"printer-{i % 10}",
                sender="app@fabrikam.com" if i % 3 == 0 else f"scan{i % 7}@contoso.com",
                rcpts=rcpts,
                deferred=i % 5 == 0,
                held=i % 97 == 0,
            )
        )
    return out


def bulk_queue(spool_dir: Path, data: list[Row]) -> None:
    """Write ``data`` with the spool's own row writer in one transaction (and a tiny body file per
    message, without fsync): seconds instead of the minutes 20,000 acknowledged messages take."""
    conn = sqlite3.connect(spool_dir / "queue.db", isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN IMMEDIATE")
        SqliteSpool._insert_rows(
            conn,
            [(r.queue_id, Envelope(r.sender, r.rcpts, device=r.device, peer="10.0.0.9"), 40) for r in data],
            T0,
        )
        conn.executemany(
            "UPDATE recipients SET state='deferred', attempts=1, next_attempt=?, last_reply=?"
            " WHERE queue_id=?",
            [(T0 + 3600, BUSY, r.queue_id) for r in data if r.deferred],
        )
        conn.executemany(
            "UPDATE messages SET held=1 WHERE queue_id=?", [(r.queue_id,) for r in data if r.held]
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    for r in data:
        (spool_dir / "messages" / r.queue_id).write_bytes(b"Subject: x\r\n\r\nbody of the message\r\n")


@pytest.fixture
async def big_queue(tmp_path: Path) -> tuple[Path, list[Row]]:
    spool_dir = tmp_path / "spool"
    spool = SqliteSpool(spool_dir)
    await spool.open()
    await spool.close()
    data = rows(COUNT)
    await asyncio.to_thread(bulk_queue, spool_dir, data)
    return spool_dir, data


async def test_spool_query_filters_in_sql(big_queue: tuple[Path, list[Row]]) -> None:
    spool_dir, data = big_queue
    spool = SqliteSpool(spool_dir)
    await spool.open()
    try:
        started = time.monotonic()
        page = await spool.query(QueueFilter(), limit=100)
        elapsed = time.monotonic() - started
        assert page.total == COUNT and [e.queue_id for e in page.entries] == [r.queue_id for r in data[:100]]
        assert elapsed < 10, elapsed  # generous: ~0.05 s here; loading all 20,000 took ~40 s before
        first = page.entries[0]
        assert first.envelope.device == "printer-0" and first.held and len(first.recipients) == 2
        assert first.recipients[0].last_reply == BUSY and first.recipients[0].state is RcptState.DEFERRED

        deferred, queued, held = QueueState.DEFERRED, QueueState.QUEUED, QueueState.HELD
        cases: list[tuple[QueueFilter, Callable[[Row], bool]]] = [
            (QueueFilter(state=deferred), lambda r: r.deferred),
            (
                QueueFilter(state=queued, device="printer-3"),
                lambda r: not r.deferred and r.device == "printer-3",
            ),
            (QueueFilter(state=held), lambda r: r.held),
            (QueueFilter(sender="APP@fabrikam.com"), lambda r: r.sender == "app@fabrikam.com"),
            (
                QueueFilter(sender="@contoso.com", device="printer-1"),
                lambda r: r.device == "printer-1" and r.sender.endswith("@contoso.com"),
            ),
            (QueueFilter(sender="scan*@contoso.com"), lambda r: r.sender.startswith("scan")),
            (QueueFilter(recipient="@partner.org"), lambda r: len(r.rcpts) == 2),
            (
                QueueFilter(recipient="user7@contoso.com", state=deferred),
                lambda r: r.rcpts[0] == "user7@contoso.com" and r.deferred,
            ),
            (QueueFilter(sender="<>"), lambda r: False),
            (QueueFilter(sender="%"), lambda r: False),  # SQL wildcards are literal characters
            (QueueFilter(recipient="user_@contoso.com"), lambda r: False),
        ]
        for flt, match in cases:
            expected = [r.queue_id for r in data if match(r)]
            page = await spool.query(flt, limit=25)
            assert page.total == len(expected), flt
            assert [e.queue_id for e in page.entries] == expected[:25], flt
        everything = await spool.query(QueueFilter(state=QueueState.HELD), limit=None)
        assert len(everything.entries) == everything.total == len([r for r in data if r.held])

        now = T0 + 10
        flt = QueueFilter(state=QueueState.DEFERRED, device="printer-5")
        retried = await spool.retry_matching(flt, now)
        expected = {r.queue_id for r in data if r.deferred and r.device == "printer-5"}
        assert retried == len(expected) > 0
        due = await spool.query(QueueFilter(state=QueueState.DEFERRED), limit=None)
        for e in due.entries:
            assert (e.recipients[0].next_attempt == now) == (e.queue_id in expected), e.queue_id
    finally:
        await spool.close()


def cli_json(*args: str) -> dict[str, object]:
    r = run_cli("queue", *args)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert isinstance(out, dict)
    return out


@pytest.mark.slow
async def test_queue_list_and_retry_by_filter_on_20000_messages(
    tmp_path: Path, big_queue: tuple[Path, list[Row]]
) -> None:
    _, data = big_queue
    config = str(write_config(tmp_path))
    started = time.monotonic()
    r = await asyncio.to_thread(run_cli, "queue", "list", "-c", config)
    elapsed = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert f"{COUNT} message(s) in the queue; showing the oldest 100 (--limit)" in r.stdout
    assert (
        data[0].queue_id in r.stdout and data[99].queue_id in r.stdout and data[100].queue_id not in r.stdout
    )
    print(f"relay365 queue list on {COUNT} messages: {elapsed:.2f} s (whole command, Python start included)")

    out = await asyncio.to_thread(
        cli_json,
        "list",
        "--state",
        "deferred",
        "--device",
        "printer-0",
        "--limit",
        "3",
        "--json",
        "-c",
        config,
    )
    expected = [r.queue_id for r in data if r.deferred and r.device == "printer-0"]
    assert out["total"] == len(expected) and out["shown"] == 3
    messages = out["messages"]
    assert isinstance(messages, list)
    assert [m["queue_id"] for m in messages] == expected[:3]
    assert messages[0]["device"] == "printer-0" and messages[0]["held"] is True
    assert messages[0]["recipients"][0] == {
        "rcpt": "user0@contoso.com",
        "state": "deferred",
        "attempts": 1,
        "next_attempt": T0 + 3600,
        "transport": "",  # (entry_dict: one shape with the console; no transport recorded here)
        "last_reply": BUSY,
    }
    out = await asyncio.to_thread(
        cli_json,
        "list",
        "--sender",
        "app@fabrikam.com",
        "--recipient",
        "@partner.org",
        "--json",
        "-c",
        config,
    )
    assert out["total"] == sum(1 for r in data if r.sender == "app@fabrikam.com" and len(r.rcpts) == 2)

    r = await asyncio.to_thread(run_cli, "queue", "list", "--state", "frozen", "-c", config)
    assert r.returncode == 2 and "frozen" in r.stderr

    before = time.time()
    r = await asyncio.to_thread(
        run_cli, "queue", "retry", "--device", "printer-7", "--state", "deferred", "-c", config
    )
    assert r.returncode == 0, r.stderr
    retried = [r.queue_id for r in data if r.device == "printer-7" and r.deferred]
    assert f"{len(retried)} message(s) scheduled for delivery now" in r.stdout
    spool = SqliteSpool(tmp_path / "spool")
    await spool.open()
    try:
        page = await spool.query(QueueFilter(state=QueueState.DEFERRED), limit=None)
        now_due = {e.queue_id for e in page.entries if e.recipients[0].next_attempt != T0 + 3600}
        assert now_due == set(retried)
        assert all(
            before <= e.recipients[0].next_attempt <= time.time()
            for e in page.entries
            if e.queue_id in now_due
        )

        r = await asyncio.to_thread(run_cli, "queue", "retry", "--all", "-c", config)
        assert r.returncode == 0 and f"{COUNT} message(s) scheduled for delivery now" in r.stdout
        page = await spool.query(QueueFilter(state=QueueState.DEFERRED), limit=None)
        assert all(before <= e.recipients[0].next_attempt <= time.time() for e in page.entries)
    finally:
        await spool.close()

    r = await asyncio.to_thread(run_cli, "queue", "retry", "-c", config)
    assert r.returncode == 2 and "--all" in r.stderr  # nothing named: refuse rather than guess
    r = await asyncio.to_thread(run_cli, "queue", "retry", data[1].queue_id, "--all", "-c", config)
    assert r.returncode == 2


async def test_api_queue_filters(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        listener=[{"name": "lan", "port": 0, "tls": "none"}],
        transport=[smarthost(closed_port())],
        delivery={"min_backoff": 600, "max_backoff": 600, "poll_interval": 0.2},
        admin={"port": 0},
    )
    clock = Clock()
    # the API needs a login or a token (only /api/health is open)
    token = AccountStore(tmp_path / "spool" / "admin-users.json").create_token("ci", Role.VIEWER)
    async with running_relay(settings, clock=clock) as relay:
        assert relay.admin is not None
        await relay.spool.enqueue(Envelope("a@contoso.com", ("x@contoso.com",), device="copier"), b"x\r\n")
        held = await relay.spool.enqueue(
            Envelope("b@contoso.com", ("y@fabrikam.com",), device="copier"), b"x\r\n"
        )
        await relay.spool.enqueue(Envelope("c@contoso.com", ("z@contoso.com",), device="app"), b"x\r\n")
        await relay.spool.hold(held, True)
        base = f"http://127.0.0.1:{relay.admin.port}"
        auth = {"authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=10, headers=auth) as http:
            got = (await http.get("/api/queue", params={"device": "copier", "limit": 1})).json()
            assert got["total"] == 2 and len(got["messages"]) == 1
            got = (await http.get("/api/queue", params={"state": "held"})).json()
            assert got["total"] == 1 and got["messages"][0]["queue_id"] == held
            got = (await http.get("/api/queue", params={"recipient": "@fabrikam.com"})).json()
            assert [m["queue_id"] for m in got["messages"]] == [held]
            got = (await http.get("/api/queue", params={"sender": "c@contoso.com"})).json()
            assert got["total"] == 1 and got["messages"][0]["device"] == "app"
            bad = await http.get("/api/queue", params={"state": "frozen"})
            assert bad.status_code == 400 and "state" in bad.json()["error"]
