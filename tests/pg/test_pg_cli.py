"""``relay365 spool copy`` moves a SQLite queue into PostgreSQL without loss (and refuses while a relay
still works on it); ``doctor``'s check of the PostgreSQL spool."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay365.diagnostics.checks.relaycfg import check_postgres
from relay365.diagnostics.checks.result import Status
from relay365.spool.model import Bounce, Envelope, PaceEvent, QueueEntry, RcptState, RecipientUpdate
from relay365.spool.pg_schema import CURRENT
from relay365.spool.postgres import PgSpool, PgTarget
from relay365.spool.sqlite import SqliteSpool
from tests.conftest import make_settings
from tests.core.helpers import T0, Clock, run_cli
from tests.pgcluster import PgDatabase

ENV = Envelope(
    "scanner@contoso.com",
    ("a@contoso.com", "b@fabrikam.com"),
    device="printer",
    peer="10.0.0.9",
    listener="lan",
    subject="scan",
    message_id="scan-1@contoso.com",
)


async def old_queue(directory: Path, clock: Clock) -> list[QueueEntry]:
    """A SQLite spool with messages in every state a queue holds, and pacing history."""
    spool = SqliteSpool(directory, clock=clock)
    await spool.open()
    try:
        await spool.recover("old-relay")
        big = b"Subject: big\r\n\r\n" + bytes(range(256)) * 4096 * 3  # 3 MiB and a bit: many chunks
        q1 = await spool.enqueue(ENV, b"Subject: scan\r\n\r\nhello\r\n")
        await asyncio.sleep(0.002)
        q2 = await spool.enqueue(Envelope("app@fabrikam.com", ("x@contoso.com",), smtputf8=True), big)
        await asyncio.sleep(0.002)
        q3 = await spool.enqueue(
            Envelope("erp@contoso.com", ("y@contoso.com",)), b"Subject: held\r\n\r\n.\r\n"
        )
        await spool.hold(q3, True)
        claimed = await spool.claim(owner="old-relay", now=T0, limit=1, lease=60)
        assert [e.queue_id for e in claimed] == [q1]
        await spool.record(
            q1,
            [
                RecipientUpdate("a@contoso.com", RcptState.DELIVERED, "250 2.0.0 OK", transport="submission"),
                RecipientUpdate(
                    "b@fabrikam.com", RcptState.DEFERRED, "451 4.7.500 busy", T0 + 300, True, "sub"
                ),
            ],
            owner="old-relay",
            bounce=Bounce(
                b"Subject: delayed\r\n\r\nsorry\r\n", Envelope("", ("scanner@contoso.com",), is_dsn=True)
            ),
            pace_events=[PaceEvent("mailbox:scanner@contoso.com", T0 - 5, 1)],
        )
        assert q2
        return await spool.list()
    finally:
        await spool.close()


async def bodies(spool: SqliteSpool | PgSpool, entries: list[QueueEntry]) -> dict[str, bytes]:
    out = {}
    for e in entries:
        async with spool.body(e) as reader:
            out[e.queue_id] = await reader.read_all()
    return out


def plain(entries: list[QueueEntry]) -> list[QueueEntry]:
    from dataclasses import replace

    return [replace(e, body_ref="", claimed_by="", claimed_until=0.0) for e in entries]


async def test_spool_copy_moves_every_message_state_and_pacing_window(tmp_path: Path, pg: PgDatabase) -> None:
    clock = Clock()
    directory = tmp_path / "spool"
    before = await old_queue(directory, clock)
    assert len(before) == 4 and any(e.envelope.is_dsn for e in before) and any(e.held for e in before)
    env = {"PGPASSWORD": pg.password}
    r = await asyncio.to_thread(
        run_cli, "spool", "copy", "--from", f"sqlite:{directory}", "--to", pg.url, env=env
    )
    assert r.returncode == 0, r.stderr
    assert (
        "copied 4 message(s)" in r.stdout and "1 pacing event(s)" in r.stdout and "0 were there" in r.stdout
    )

    old = SqliteSpool(directory, clock=clock)
    new = PgSpool(PgTarget(url=pg.url, password=pg.password), clock=clock)
    await old.open()
    await new.open()
    try:
        after = await new.list()
        assert plain(after) == plain(before)  # states, attempts, due times, replies, holds, facts
        assert await bodies(new, after) == await bodies(old, before)
        assert await new.pace_events(0) == [PaceEvent("mailbox:scanner@contoso.com", T0 - 5, 1)]
        # The deferred recipient is due when it was; the held message stays held.
        assert await new.next_due_time() == min(
            r.next_attempt
            for e in before
            if not e.held
            for r in e.recipients
            if r.state.value in ("queued", "deferred")
        )
    finally:
        await old.close()
        await new.close()

    again = await asyncio.to_thread(
        run_cli, "spool", "copy", "--from", f"sqlite:{directory}", "--to", pg.url, env=env
    )
    assert again.returncode == 0 and "copied 0 message(s)" in again.stdout and "4 were there" in again.stdout
    assert "0 pacing event(s)" in again.stdout  # never counted twice


async def test_spool_copy_refuses_while_a_relay_works_on_the_sqlite_spool(
    tmp_path: Path, pg: PgDatabase
) -> None:
    directory = tmp_path / "spool"
    running = SqliteSpool(directory)
    await running.open()
    try:
        await running.recover("still-running")  # holds its owner lock, as a serving relay does
        r = await asyncio.to_thread(
            run_cli,
            "spool",
            "copy",
            "--from",
            f"sqlite:{directory}",
            "--to",
            pg.url,
            env={"PGPASSWORD": pg.password},
        )
        assert r.returncode == 2 and "still works on" in r.stderr and "stop it before copying" in r.stderr
    finally:
        await running.close()
    nothing = await asyncio.to_thread(
        run_cli, "spool", "copy", "--from", f"sqlite:{tmp_path / 'nope'}", "--to", pg.url
    )
    assert nothing.returncode == 2 and "no SQLite spool at" in nothing.stderr


async def test_doctor_checks_the_connection_server_and_schema(
    tmp_path: Path, pg: PgDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAY365_TEST_PG_PASSWORD", pg.password)
    settings = make_settings(tmp_path, spool={"url": pg.url, "password_env": "RELAY365_TEST_PG_PASSWORD"})
    [ok] = await check_postgres(settings)
    assert ok.status is Status.PASS and "PostgreSQL 1" in ok.detail
    assert f"schema version {CURRENT}" in ok.detail
    with pg.connect() as conn:
        conn.execute("DELETE FROM relay365.schema_version")
    [old] = await check_postgres(settings)
    assert old.status is Status.FAIL and "relay365 spool migrate" in old.fix
    monkeypatch.setenv("RELAY365_TEST_PG_PASSWORD", "wrong")
    [bad] = await check_postgres(settings)
    assert bad.status is Status.FAIL and "cannot connect" in bad.detail and "wrong" not in bad.detail
    assert await check_postgres(make_settings(tmp_path)) == []  # SQLite: nothing to check here
