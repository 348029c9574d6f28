"""The PostgreSQL spool beyond the contract suite: a relay on it end to end, durability settings, the
schema's version check, an outage of the database, a 35 MB body streamed in chunks, and the sweep that
hands a dead node's messages to the others. Every test runs a real PostgreSQL (tests/support/pgcluster.py)."""

from __future__ import annotations

import asyncio
import hashlib
import smtplib
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from relay365.errors import LeaseLost, SpoolSchemaError
from relay365.spool import pg_schema
from relay365.spool.model import Envelope, RcptState, RecipientUpdate
from relay365.spool.pg_schema import CURRENT, migrate_url
from relay365.spool.postgres import PgSpool, PgTarget
from tests.support import (
    PgDatabase,
    PostgresCluster,
    RecordingUpstream,
    closed_port,
    make_settings,
    run_cli,
    running_relay,
    send_message,
    smarthost,
    wait_until,
    write_config,
)

PASSWORD_ENV = "RELAY365_TEST_PG_PASSWORD"
NO_TLS = [{"name": "lan", "port": 0, "tls": "none"}]
ENV = Envelope("scanner@contoso.com", ("alice@contoso.com",), device="local")


def pg_spool(db: PgDatabase | PostgresCluster, database: str = "") -> dict[str, Any]:
    url = db.url if isinstance(db, PgDatabase) else db.url(database)
    return {"url": url, "password_env": PASSWORD_ENV}


async def opened(db: PgDatabase) -> PgSpool:
    spool = PgSpool(PgTarget(url=db.url, password=db.password))
    await spool.open()
    return spool


async def test_a_relay_on_postgres_delivers_and_the_queue_commands_see_it(
    tmp_path: Path, pg: PgDatabase, upstream: RecordingUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, pg.password)
    up_down = closed_port()
    config = write_config(tmp_path, spool=pg_spool(pg), listener=NO_TLS, transport=[smarthost(up_down)])
    settings = make_settings(tmp_path, spool=pg_spool(pg), listener=NO_TLS, transport=[smarthost(up_down)])
    async with running_relay(settings) as relay:
        qid = await asyncio.to_thread(send_message, relay.ports["lan"])
        assert (await relay.spool.get(qid)).envelope.mail_from == "scanner@contoso.com"
        env = {PASSWORD_ENV: pg.password}
        listed = await asyncio.to_thread(run_cli, "queue", "list", "-c", str(config), env=env)
        assert listed.returncode == 0 and qid in listed.stdout, listed.stderr
        held = await asyncio.to_thread(run_cli, "queue", "hold", qid, "-c", str(config), env=env)
        assert held.returncode == 0 and (await relay.spool.get(qid)).held
    # The same queue, delivered by another relay on the same database (the upstream is up now). The
    # first relay's hold-back of the unreachable upstream is shared: `queue retry` lifts it.
    settings = make_settings(
        tmp_path, spool=pg_spool(pg), listener=NO_TLS, transport=[smarthost(upstream.port)]
    )
    async with running_relay(settings) as relay:
        await relay.spool.hold(qid, False)
        await asyncio.sleep(0.5)
        assert "up" in relay.scheduler.suspended() and not upstream.messages  # type: ignore[union-attr]
        await relay.spool.retry(qid, relay.clock())
        [got] = await upstream.wait_for(1)
        assert got.content.endswith(b"hello\r\n")
        await wait_until(lambda: _gone(relay.spool, qid), what="the delivered entry gone")


async def _gone(spool: Any, qid: str) -> bool:
    return not [e for e in await spool.list() if e.queue_id == qid]


async def test_commits_wait_for_the_wal_whatever_the_server_default(pg: PgDatabase) -> None:
    with pg.connect() as conn:
        conn.execute(f"ALTER DATABASE {pg.name} SET synchronous_commit = off")  # type: ignore[arg-type]
    spool = await opened(pg)
    try:

        async def show(conn: Any) -> str:
            cur = await conn.execute("SHOW synchronous_commit")
            return str((await cur.fetchone())[0])

        assert await spool.statement(show) == "on"
        assert await spool.transaction(show) == "on"
    finally:
        await spool.close()


async def test_the_schema_is_checked_and_migrated_by_command(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    name = "t_schema_" + tmp_path.name[-12:].replace("-", "_").lower()
    url = pg_cluster.create_database(name)
    try:
        spool = PgSpool(PgTarget(url=url, password=pg_cluster.password))
        with pytest.raises(
            SpoolSchemaError, match="has no relay365 spool schema yet: run 'relay365 spool migrate"
        ):
            await spool.open()
        env = {"PGPASSWORD": pg_cluster.password}
        first = await asyncio.to_thread(run_cli, "spool", "migrate", "--url", url, env=env)
        assert first.returncode == 0 and f"created the spool schema (version {CURRENT})" in first.stdout
        again = await asyncio.to_thread(run_cli, "spool", "migrate", "--url", url, env=env)
        assert again.returncode == 0 and "up to date" in again.stdout
        await spool.open()
        await spool.close()
        with pg_cluster.connect(name) as conn:
            conn.execute("INSERT INTO relay365.schema_version (version, relay365) VALUES (99, 'future')")
        with pytest.raises(SpoolSchemaError, match="version 99, newer than this relay365 knows"):
            await spool.open()
        with pg_cluster.connect(name) as conn:
            conn.execute("DELETE FROM relay365.schema_version")
        with pytest.raises(
            SpoolSchemaError, match=r"at version 0, this relay365 needs \d+: run 'relay365 spool"
        ):
            await spool.open()
        # config check says the same, before serve would start
        config = write_config(tmp_path, spool={"url": url, "password_env": PASSWORD_ENV}, listener=NO_TLS)
        check = await asyncio.to_thread(
            run_cli, "config", "check", str(config), env={PASSWORD_ENV: pg_cluster.password}
        )
        assert check.returncode != 0 and "relay365 spool migrate" in check.stderr
        assert pg_cluster.password not in check.stdout + check.stderr
    finally:
        pg_cluster.drop_database(name)


async def test_a_version_1_database_is_upgraded_with_the_follow_tables_and_keeps_its_queue(
    pg_cluster: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database an earlier relay365 made (schema version 1, a message queued): nodes refuse it until
    ``spool migrate`` applies the later versions (the trace follower's tables among them); the queued
    message is still there."""
    name = "t_v1_" + tmp_path.name[-12:].replace("-", "_").lower()
    url = pg_cluster.create_database(name)
    try:
        with monkeypatch.context() as old:  # what relay365 with schema version 1 did
            old.setattr(pg_schema, "MIGRATIONS", pg_schema.MIGRATIONS[:1])
            old.setattr(pg_schema, "CURRENT", 1)
            assert migrate_url(url, password=pg_cluster.password) == (None, 1)
        with pg_cluster.connect(name) as conn:  # a message queued by version 1 (its columns only)
            qid = "V1QUEUED"
            conn.execute(
                "INSERT INTO relay365.messages (queue_id, mail_from, device, peer, listener, smtputf8,"
                " is_dsn, size, received_at, next_due) VALUES (%s, %s, 'd', '', 'lan', false, false,"
                " 3, 0, 0)",
                (qid, ENV.mail_from),
            )
            conn.execute("INSERT INTO relay365.bodies VALUES (%s, 0, %s)", (qid, b"x\r\n"))
            conn.execute(
                "INSERT INTO relay365.recipients (queue_id, pos, rcpt, state, next_attempt)"
                " VALUES (%s, 0, 'b@contoso.com', 'queued', 0)",
                (qid,),
            )
        spool = PgSpool(PgTarget(url=url, password=pg_cluster.password))
        with pytest.raises(SpoolSchemaError, match=f"at version 1, this relay365 needs {CURRENT}"):
            await spool.open()
        env = {"PGPASSWORD": pg_cluster.password}
        done = await asyncio.to_thread(run_cli, "spool", "migrate", "--url", url, env=env)
        assert done.returncode == 0, done.stderr
        with pg_cluster.connect(name) as conn:
            versions = [r[0] for r in conn.execute("SELECT version FROM relay365.schema_version ORDER BY 1")]
            assert versions == list(range(1, CURRENT + 1))
            row = conn.execute("SELECT count(*) FROM relay365.m365_follow").fetchone()
            assert row is not None and row[0] == 0
        await spool.open()
        try:
            assert (await spool.get(qid)).envelope.mail_from == ENV.mail_from
        finally:
            await spool.close()
    finally:
        pg_cluster.drop_database(name)


def test_a_password_in_the_url_is_refused_and_never_shown(tmp_path: Path) -> None:
    for url in (
        "postgresql://relay:s3cret@db.lan/relay365",
        "postgresql://relay@db.lan/relay365?password=s3cret",
    ):
        config = write_config(tmp_path, spool={"url": url})
        r = run_cli("config", "check", str(config))
        assert r.returncode != 0 and "spool.url" in r.stderr and "password_env" in r.stderr
        assert "s3cret" not in r.stdout + r.stderr and "***" in r.stderr


async def test_an_outage_answers_451_acknowledges_nothing_and_the_pool_reconnects(
    tmp_path: Path, upstream: RecordingUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = PostgresCluster()
    try:
        cluster.start()
        migrate_url(cluster.url(), password=cluster.password)
        monkeypatch.setenv(PASSWORD_ENV, cluster.password)
        settings = make_settings(
            tmp_path,
            spool={"url": cluster.url(), "password_env": PASSWORD_ENV, "connect_timeout": 1.0},
            listener=NO_TLS,
            transport=[smarthost(upstream.port)],
            delivery={"poll_interval": 0.5},
        )
        async with running_relay(settings) as relay:
            port = relay.ports["lan"]
            first = await asyncio.to_thread(send_message, port, body=b"Subject: one\r\n\r\nbefore\r\n")
            await upstream.wait_for(1)
            await asyncio.to_thread(cluster.stop)
            code, text = await asyncio.to_thread(try_send, port, b"Subject: two\r\n\r\nduring\r\n")
            assert (code, text[:5]) == (451, "4.3.0"), (code, text)
            await asyncio.to_thread(cluster.start)
            # A device retries after a 4xx (RFC 5321 4.2.5); within seconds the relay takes mail again.
            third, refusals = await asyncio.to_thread(
                send_until_accepted, port, b"Subject: three\r\n\r\nafter\r\n"
            )
            assert refusals <= 3, refusals
            received = await upstream.wait_for(2, timeout=30)
            assert first != third
            assert [m.content.split(b"\r\n\r\n")[1] for m in received] == [b"before\r\n", b"after\r\n"]
            await wait_until(lambda: _empty(relay.spool), timeout=30, what="an empty queue")
    finally:
        cluster.destroy()


def try_send(port: int, body: bytes) -> tuple[int, str]:
    """One message as a device sends it: (the final reply code, the queue id or the reply text)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.ehlo("printer.lan")
        s.mail("scanner@contoso.com")
        s.rcpt("alice@contoso.com")
        try:
            code, reply = s.data(body)
        except smtplib.SMTPDataError as e:  # refused at DATA already
            return e.smtp_code, e.smtp_error.decode()
        return code, reply.split()[-1].decode() if code == 250 else reply.decode()


def send_until_accepted(port: int, body: bytes, timeout: float = 30.0) -> tuple[str, int]:
    """Retry like a device after a 4xx (RFC 5321 4.2.5) until 250; every refusal must be 451 4.3.0."""
    deadline = time.monotonic() + timeout
    refusals = 0
    while True:
        code, text = try_send(port, body)
        if code == 250:
            return text, refusals
        assert code == 451 and text.startswith("4.3.0"), (code, text)
        refusals += 1
        assert time.monotonic() < deadline, "the relay did not take mail again"
        time.sleep(0.5)


async def _empty(spool: Any) -> bool:
    return not await spool.list()


async def test_a_35_mb_message_is_streamed_in_chunks_never_held_whole(pg: PgDatabase) -> None:
    spool = await opened(pg)
    try:
        await spool.recover("node-a")
        piece = bytes(range(256)) * 256  # 64 KiB
        count = 35 * 16
        digest = hashlib.sha256()
        msg = spool.incoming()
        tracemalloc.start()
        try:
            msg.write(b"Subject: big\r\n\r\n")
            digest.update(b"Subject: big\r\n\r\n")
            for _ in range(count):
                msg.write(piece)
                digest.update(piece)
                await msg.drain()
            with pg.connect() as conn:  # half-received: registered under its owner, chunks stored
                row = conn.execute("SELECT owner FROM relay365.incoming WHERE queue_id = %s", (msg.queue_id,))
                assert row.fetchone() == ("node-a",)
            qid = await msg.commit(ENV)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * 1024 * 1024, peak  # a 35 MiB message, never more than a few chunks at once
        with pg.connect() as conn:
            chunks, stored = conn.execute(
                "SELECT count(*), sum(octet_length(chunk)) FROM relay365.bodies WHERE queue_id = %s", (qid,)
            ).fetchone()  # type: ignore[misc]
            assert conn.execute("SELECT count(*) FROM relay365.incoming").fetchone() == (0,)
        entry = await spool.get(qid)
        assert stored == entry.size == 16 + count * len(piece) and chunks >= entry.size // (256 * 1024)
        again = hashlib.sha256()
        async with spool.body(entry) as reader:
            async for chunk in reader.chunks(1 << 20):
                again.update(chunk)
        assert again.hexdigest() == digest.hexdigest()
    finally:
        await spool.close()


async def test_a_dead_nodes_claims_go_to_the_others_by_the_sweep(pg: PgDatabase) -> None:
    """No explicit recover: node-b's periodic sweep sees node-a's lock gone and releases its claim
    (NOTIFY wakes node-b), well before the 10-minute lease would have."""
    a, b = await opened(pg), await opened(pg)
    try:
        await a.recover("node-a")
        await b.recover("node-b")
        qid = await a.enqueue(ENV, b"Subject: x\r\n\r\nx\r\n")
        assert await b.wait_changed(5)
        now = 1_900_000_000.0
        assert [e.queue_id for e in await a.claim(owner="node-a", now=now, limit=5, lease=600)] == [qid]
        await a.close()  # node-a dies with the claim
        assert await b.wait_changed(30), "the sweep did not release the dead node's claim"
        assert [e.queue_id for e in await b.claim(owner="node-b", now=now, limit=5, lease=600)] == [qid]
        await b.record(
            qid, [RecipientUpdate("alice@contoso.com", RcptState.DELIVERED, "250 ok")], owner="node-b"
        )
        assert await b.list() == []
        late = await opened(pg)  # node-a's late outcome (had it survived) would be refused
        try:
            with pytest.raises(LeaseLost):
                await late.record(qid, [], owner="node-a")
        finally:
            await late.close()
    finally:
        await a.close()
        await b.close()


async def test_a_version_1_schema_is_migrated_and_its_bodies_stay_as_they_were(
    pg_cluster: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 3 adds ``messages.stuffed``: bodies of earlier versions hold the message itself
    (false) and are read as such; a message spooled after the migration is in wire form (true)."""
    from relay365.spool import pg_schema

    name = "t_v1_" + tmp_path.name[-12:].replace("-", "_").lower()
    url = pg_cluster.create_database(name)
    try:
        with monkeypatch.context() as m:
            m.setattr(pg_schema, "MIGRATIONS", pg_schema.MIGRATIONS[:1])  # as relay365 with version 1
            m.setattr(pg_schema, "CURRENT", 1)
            assert migrate_url(url, password=pg_cluster.password) == (None, 1)
        with pg_cluster.connect(name) as conn:
            assert conn.execute("SELECT max(version) FROM relay365.schema_version").fetchone() == (1,)
            conn.execute(
                "INSERT INTO relay365.messages (queue_id, mail_from, device, peer, listener, smtputf8,"
                " is_dsn, size, received_at, next_due)"
                " VALUES ('OLD1', 'a@contoso.com', 'd', '', 'lan', false, false, 13, 0, 0)"
            )
            conn.execute("INSERT INTO relay365.bodies VALUES ('OLD1', 0, %s)", (b".dot line\r\n\r\n",))
            conn.execute(
                "INSERT INTO relay365.recipients (queue_id, pos, rcpt, state, next_attempt)"
                " VALUES ('OLD1', 0, 'b@contoso.com', 'queued', 0)"
            )
        assert migrate_url(url, password=pg_cluster.password) == (1, CURRENT)
        spool = PgSpool(PgTarget(url=url, password=pg_cluster.password))
        await spool.open()
        try:
            [old] = await spool.list()
            assert not old.stuffed
            new_id = await spool.enqueue(ENV, b".dot line\r\n\r\n")
            new = await spool.get(new_id)
            assert new.stuffed and new.size == len(b"..dot line\r\n\r\n")  # (the stored bytes)
            async with spool.body(old) as reader:
                assert await reader.read_all() == b".dot line\r\n\r\n"  # as version 1 stored it
            async with spool.body(new) as reader:
                assert await reader.read_all() == b"..dot line\r\n\r\n"  # the wire form
        finally:
            await spool.close()
    finally:
        pg_cluster.drop_database(name)
