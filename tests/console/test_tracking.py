"""The tracking log (SQLite file and the memory double, one suite), header facts read while DATA
streams, and the queue schema additions on an old queue database."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay365.ingress.facts import SCAN_LIMIT, HeaderFacts
from relay365.observability.tracking import (
    EventKind,
    MemoryTrackingLog,
    TraceQuery,
    TrackingEvent,
    TrackingLog,
)
from relay365.observability.tracking_pg import PgTrackingLog
from relay365.observability.tracking_sqlite import SqliteTrackingLog
from relay365.spool.model import Envelope, QueueFilter, QueueState
from relay365.spool.pg_connect import PgTarget
from relay365.spool.sqlite import SqliteSpool
from tests.support import T0, Clock


@pytest.fixture(params=["sqlite", "memory", "postgres"])
async def tracking(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TrackingLog]:
    if request.param == "memory":
        yield MemoryTrackingLog()
        return
    log: SqliteTrackingLog | PgTrackingLog
    if request.param == "postgres":  # the spool's database (several relays: one message trace)
        pg = request.getfixturevalue("pg")
        log = PgTrackingLog(PgTarget(url=pg.url, password=pg.password), log_events=False)
    else:
        log = SqliteTrackingLog(tmp_path / "tracking.db", log_events=False)
    await log.open(purge_every=None)
    try:
        yield log
    finally:
        await log.close()


def ev(kind: EventKind, at: float, **kw: str) -> TrackingEvent:
    return TrackingEvent(kind=kind, at=at, **kw)


async def test_search_filters_and_paging(tracking: TrackingLog) -> None:
    for i in range(25):
        tracking.record(
            ev(
                EventKind.DEFERRED if i % 5 == 0 else EventKind.DELIVERED,
                T0 + i,
                queue_id=f"Q{i:02d}",
                sender="scan@contoso.com" if i % 2 else "app@fabrikam.com",
                recipient=f"User{i}@Contoso.com",
                subject=f"Scan {i} from the 3rd floor",
                message_id=f"m{i}@printer",
                device="mfp" if i < 10 else "app",
                transport="submission",
                reply="451 4.7.500 Server busy" if i % 5 == 0 else "250 2.0.0 OK",
            )
        )
    await tracking.flush()
    assert [
        e.queue_id for e in (await tracking.search(TraceQuery(recipient="user7@contoso.com"))).events
    ] == ["Q07"]
    by_domain = await tracking.search(TraceQuery(sender="@fabrikam.com", limit=5))
    assert [e.queue_id for e in by_domain.events] == ["Q24", "Q22", "Q20", "Q18", "Q16"]
    assert by_domain.next_cursor is not None
    older = await tracking.search(TraceQuery(sender="@fabrikam.com", limit=5, before=by_domain.next_cursor))
    assert [e.queue_id for e in older.events] == ["Q14", "Q12", "Q10", "Q08", "Q06"]
    last = await tracking.search(TraceQuery(sender="@fabrikam.com", limit=5, before=older.next_cursor))
    assert [e.queue_id for e in last.events] == ["Q04", "Q02", "Q00"] and last.next_cursor is None
    assert len((await tracking.search(TraceQuery(subject="3RD FLOOR", limit=100))).events) == 25
    assert [e.queue_id for e in (await tracking.search(TraceQuery(message_id="<m3@printer>"))).events] == [
        "Q03"
    ]
    deferred = await tracking.search(TraceQuery(kinds=(EventKind.DEFERRED,), device="mfp"))
    assert [e.queue_id for e in deferred.events] == ["Q05", "Q00"]
    window = await tracking.search(TraceQuery(since=T0 + 20, until=T0 + 22))
    assert [e.queue_id for e in window.events] == ["Q22", "Q21", "Q20"]
    ones = await tracking.search(TraceQuery(recipient="user1*@contoso.com"))
    assert [e.queue_id for e in ones.events] == [
        f"Q{i:02d}" for i in (19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 1)
    ]
    # SQL wildcards in a search are text, not patterns.
    assert (await tracking.search(TraceQuery(subject="%"))).events == []
    assert (await tracking.search(TraceQuery(recipient="user_@contoso.com"))).events == []
    counts = await tracking.counts(T0 + 15)
    assert counts[EventKind.DELIVERED] == 8 and counts[EventKind.DEFERRED] == 2
    assert tracking.last_id() == max(e.id for e in (await tracking.search(TraceQuery(limit=1))).events)


async def test_purge_by_age(tracking: TrackingLog) -> None:
    for i in range(10):
        tracking.record(ev(EventKind.RECEIVED, T0 + i * 86400, queue_id=f"Q{i}"))
    await tracking.flush()
    assert await tracking.purge(T0 + 5 * 86400) == 5
    left = await tracking.search(TraceQuery(limit=100))
    assert [e.queue_id for e in left.events] == ["Q9", "Q8", "Q7", "Q6", "Q5"]


async def test_long_fields_are_clipped(tracking: TrackingLog) -> None:
    tracking.record(ev(EventKind.RECEIVED, T0, subject="x" * 5000, reply="5" * 3000))
    await tracking.flush()
    [e] = (await tracking.search(TraceQuery())).events
    assert len(e.subject) == 998 and e.subject.endswith("...") and len(e.reply) == 998


async def test_sqlite_file_survives_restart_and_retention_loop(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "tracking.db"
    log = SqliteTrackingLog(path, retention_days=1, clock=clock, log_events=False)
    await log.open(purge_every=None)
    log.record(ev(EventKind.RECEIVED, clock() - 2 * 86400, queue_id="OLD"))
    log.record(ev(EventKind.RECEIVED, clock(), queue_id="NEW"))
    await log.close()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    log = SqliteTrackingLog(path, retention_days=1, clock=clock, log_events=False)
    await log.open(purge_every=3600)  # the loop purges once at start, then hourly
    try:
        assert log.last_id() == 2
        import asyncio

        for _ in range(200):
            if [e.queue_id for e in (await log.search(TraceQuery())).events] == ["NEW"]:
                break
            await asyncio.sleep(0.02)
        assert [e.queue_id for e in (await log.search(TraceQuery())).events] == ["NEW"]
        mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    finally:
        await log.close()


async def test_tracking_events_reach_the_log_as_structured_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = SqliteTrackingLog(tmp_path / "t.db")
    await log.open(purge_every=None)
    with caplog.at_level("INFO", logger="relay365.tracking"):
        log.record(
            ev(EventKind.DEFERRED, T0, queue_id="Q1", recipient="a@b.c", transport="up", reply="451 x")
        )
        await log.flush()
    await log.close()
    [rec] = [r for r in caplog.records if r.name == "relay365.tracking"]
    assert rec.getMessage() == "track deferred Q1 to=<a@b.c> via=up reply='451 x'"
    assert rec.tracking["kind"] == "deferred" and rec.tracking["queue_id"] == "Q1"  # type: ignore[attr-defined]


def test_header_facts() -> None:
    f = HeaderFacts()
    for piece in (
        b"From: a@b\r\nSubj",
        b"ect: =?utf-8?q?Scan_f=C3=BCr?=\r\n  Alice\r\nMessage-ID:",
        b" <abc@host>\r\n\r\nbody",
    ):
        f.feed(piece)
    assert f.done and f.subject == "Scan für Alice" and f.message_id == "abc@host"
    g = HeaderFacts()
    g.feed(b"\r\nSubject: not a header\r\n")  # no header section at all
    assert g.done and g.subject == ""
    h = HeaderFacts()
    h.feed(b"X-Long: " + b"a" * (SCAN_LIMIT + 10))
    assert h.done and h.subject == ""  # bounded: gave up at the limit
    k = HeaderFacts()
    k.feed(b"Subject: only headers, no body")
    k.finish()
    assert k.subject == "only headers, no body"


async def test_old_queue_database_gets_the_new_columns(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    db = sqlite3.connect(spool_dir / "queue.db")
    db.executescript(
        """
        CREATE TABLE messages (queue_id TEXT PRIMARY KEY, mail_from TEXT NOT NULL, device TEXT NOT NULL,
            peer TEXT NOT NULL, listener TEXT NOT NULL, smtputf8 INTEGER NOT NULL, is_dsn INTEGER NOT NULL,
            size INTEGER NOT NULL, received_at REAL NOT NULL, held INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE recipients (queue_id TEXT NOT NULL, pos INTEGER NOT NULL, rcpt TEXT NOT NULL,
            state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL,
            last_reply TEXT NOT NULL DEFAULT '', PRIMARY KEY (queue_id, pos));
        INSERT INTO messages VALUES
            ('0000000000AOLD00001', 'a@b.c', 'mfp', '10.0.0.5', 'lan', 0, 0, 10, 1.0, 0);
        INSERT INTO recipients VALUES ('0000000000AOLD00001', 0, 'x@y.z', 'deferred', 1, 2.0, '451 busy');
        """
    )
    db.commit()
    db.close()
    (spool_dir / "messages").mkdir()
    (spool_dir / "messages" / "0000000000AOLD00001").write_bytes(b"Subject: x\r\n\r\ny\r\n")
    spool = SqliteSpool(spool_dir)
    await spool.open()
    try:
        old = await spool.get("0000000000AOLD00001")
        assert old.envelope.subject == "" and old.recipients[0].transport == ""
        qid = await spool.enqueue(
            Envelope(mail_from="s@c.d", rcpt_tos=("r@e.f",), subject="Hello", message_id="id@x"), b"x\r\n"
        )
        new = await spool.get(qid)
        assert new.envelope.subject == "Hello" and new.envelope.message_id == "id@x"
        page = await spool.query(QueueFilter(state=QueueState.DEFERRED), limit=50)
        assert [e.queue_id for e in page.entries] == ["0000000000AOLD00001"] and page.total == 1
    finally:
        await spool.close()


async def test_queue_query_filters_and_keyset_paging(tmp_path: Path) -> None:
    clock = Clock(T0)
    spool = SqliteSpool(tmp_path / "spool", clock=clock)
    await spool.open()
    try:
        ids = []
        for i in range(12):
            env = Envelope(
                mail_from="" if i == 0 else f"dev{i % 3}@contoso.com",
                rcpt_tos=(f"user{i}@fabrikam.com", "boss@contoso.com"),
                device=f"mfp{i % 2}",
            )
            ids.append(await spool.enqueue(env, b"Subject: s\r\n\r\nb\r\n"))
        await spool.hold(ids[3], True)

        async def total(**where: Any) -> int:
            return (await spool.query(QueueFilter(**where), limit=50)).total

        # pages follow the queue id (arrival to the millisecond; two messages of one millisecond are in
        # the order of their random part)
        newest = sorted(ids, reverse=True)
        page = await spool.query(QueueFilter(), limit=5, order="newest")
        assert page.total == 12 and [e.queue_id for e in page.entries] == newest[:5]
        second = await spool.query(QueueFilter(), limit=5, order="newest", cursor=page.next_cursor)
        assert [e.queue_id for e in second.entries] == newest[5:10]
        third = await spool.query(QueueFilter(), limit=5, order="newest", cursor=second.next_cursor)
        assert [e.queue_id for e in third.entries] == newest[10:] and third.next_cursor is None
        oldest = await spool.query(QueueFilter(), limit=2, order="oldest")
        assert [e.queue_id for e in oldest.entries] == sorted(ids)[:2]
        assert await total(sender="<>") == 1
        assert await total(sender="dev1@CONTOSO.com") == 4
        assert await total(recipient="user1*") == 3  # 1, 10, 11
        assert await total(recipient="@contoso.com") == 12
        assert await total(device="mfp1", state=QueueState.QUEUED) == 6
        assert await total(state=QueueState.OPEN) == 12
        held = await spool.query(QueueFilter(state=QueueState.HELD), limit=50)
        assert [e.queue_id for e in held.entries] == [ids[3]]
        assert await total(state=QueueState.DEFERRED) == 0
        assert await total(min_age=3600) == 0
        clock.advance(7200)
        assert await total(min_age=3600) == 12
    finally:
        await spool.close()


async def test_tracking_log_keeps_off_the_spools_last_free_space(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = SqliteTrackingLog(tmp_path / "t.db", log_events=False, min_free=1 << 62)  # never enough
    await log.open(purge_every=None)
    try:
        log.record(ev(EventKind.RECEIVED, T0, queue_id="Q1"))
        log.record(ev(EventKind.RECEIVED, T0, queue_id="Q2"))
        await log.flush()
        assert (await log.search(TraceQuery())).events == []
        assert caplog.text.count("not recording events until there is") == 1  # said once, not per batch
        log.min_free = 0  # space again: recording resumes
        log.record(ev(EventKind.RECEIVED, T0, queue_id="Q3"))
        await log.flush()
        assert [e.queue_id for e in (await log.search(TraceQuery())).events] == ["Q3"]
    finally:
        await log.close()
