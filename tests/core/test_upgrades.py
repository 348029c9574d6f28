"""Upgrades: a queue.db and a tracking.db written by earlier relay365 releases are upgraded in place when
the current relay opens them (schema version 0 -> 2, ``PRAGMA user_version``), and their mail is
delivered; a database written by a NEWER relay365 is refused with a clear error and left untouched."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import time
from pathlib import Path

import pytest

from relay365.errors import SchemaVersionError
from relay365.observability.tracking import TraceQuery
from relay365.observability.tracking_schema import index_columns
from relay365.observability.tracking_sqlite import SqliteTrackingLog
from relay365.spool import sqlite_schema
from relay365.spool.schema_version import Schema, migrate, read_version
from relay365.spool.sqlite import SqliteSpool
from tests.core.old_databases import OldMessage, OldRecipient, first_release_queue, first_tracking_log
from tests.support import run_cli, serving, smarthost_cfg, smtp_sink, wait_for, write_config

BODY = b"Subject: scan from before the upgrade\r\n\r\npage 1\r\n"
HELD = b"Subject: held before the upgrade\r\n\r\nheld\r\n"
QID, HELD_QID = "0193A4F2C81D7B3E9A1", "0193A4F2C82AAAA0001"


def sha(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.exists()}


def first_release_spool(directory: Path) -> Path:
    """A queued message with one recipient queued, one deferred (attempted once, due again now) and one
    already delivered; and a held message. As the first release wrote them."""
    now = time.time()
    message = OldMessage(
        QID,
        "scanner@contoso.com",
        (
            OldRecipient("alice@contoso.com"),
            OldRecipient("bob@contoso.com", "deferred", 1, now - 60, "451 4.7.500 Server busy"),
            OldRecipient("carol@contoso.com", "delivered", 1, now - 600, "250 2.0.0 OK"),
        ),
        BODY,
        received_at=now - 900,
    )
    held = OldMessage(HELD_QID, "app@contoso.com", (OldRecipient("dave@contoso.com"),), HELD, now - 800, True)
    return first_release_queue(directory, [message, held], pacing=[("up", now - 600, 1)])


def test_a_first_release_queue_is_upgraded_and_its_mail_delivered(tmp_path: Path) -> None:
    """``relay365 serve`` on the first release's spool: upgraded in place (logged once), the queued and
    the deferred recipient delivered, the delivered one not sent again, the held message kept held."""
    spool_dir = tmp_path / "spool"
    db = first_release_spool(spool_dir)
    assert read_version(db) == 0
    with smtp_sink() as sink:
        config = write_config(
            tmp_path,
            listener=[{"name": "lan", "port": 0, "tls": "none"}],
            transport=[smarthost_cfg(sink.port, timeout=5)],
        )
        with serving(config, tmp_path / "serve.log") as server:
            wait_for(lambda: any(d.endswith(b"page 1\n\n") for d in sink.dumps()), what="the old message")

            def done() -> bool:
                with sqlite3.connect(db) as conn:
                    return conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1

            wait_for(done, what="the old message to leave the queue")
            listed = run_cli("queue", "list", "-c", str(config))
            assert server.terminate() == 0
        [dump] = sink.dumps()
    log = server.log_text()
    assert b"X-Rcpt-Args: <alice@contoso.com>\nX-Rcpt-Args: <bob@contoso.com>\n" in dump
    assert b"carol" not in dump and b"held" not in dump
    assert log.count("the queue upgraded from schema version 0") == 1, log
    assert "tracking log upgraded" not in log  # a new tracking.db is created, not "upgraded"
    assert listed.returncode == 0 and HELD_QID in listed.stdout and QID not in listed.stdout, listed
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
        # (its body is the message itself, as the first release wrote it: not in wire form)
        assert conn.execute("SELECT queue_id, held, stuffed FROM messages").fetchall() == [(HELD_QID, 1, 0)]
        rows = conn.execute("SELECT rcpt, state FROM recipients").fetchall()
        assert rows == [("dave@contoso.com", "queued")]
    assert (spool_dir / "messages" / HELD_QID).read_bytes() == HELD
    assert not (spool_dir / "messages" / QID).exists()


def newer(db: Path, version: int = 7) -> dict[str, str]:
    """Mark ``db`` as written by a future release; the bytes of the file (checkpointed, no WAL left)."""
    with sqlite3.connect(db, isolation_level=None) as conn:
        conn.execute(f"PRAGMA user_version = {version}")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    return sha([db, db.with_name(db.name + "-wal")])


@pytest.mark.slow
def test_a_queue_of_a_newer_relay365_is_refused_and_left_untouched(tmp_path: Path) -> None:
    db = first_release_spool(tmp_path / "spool")
    asyncio.run(_open_close(tmp_path / "spool"))  # now a current queue (version 2)
    before = newer(db)
    config = write_config(tmp_path, transport=[smarthost_cfg(9)])
    for args in (("serve", "-c"), ("config", "check"), ("queue", "list", "-c")):
        r = run_cli(*args, str(config))
        text = " ".join((r.stdout + r.stderr).split())
        assert r.returncode != 0, (args, text)
        assert f"{db} was written by a newer relay365: the queue has schema version 7" in text, (args, text)
        assert "knows versions up to 2" in text and "pipx upgrade relay365" in text, text
        assert "Traceback" not in text
    assert sha([db, db.with_name("queue.db-wal")]) == before
    assert not db.with_name("queue.db-wal").exists()


async def _open_close(directory: Path) -> None:
    spool = SqliteSpool(directory)
    await spool.open()
    await spool.close()


async def test_upgrading_twice_writes_once_and_a_newer_queue_is_refused_by_the_spool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first_release_spool(tmp_path / "spool")
    caplog.set_level(logging.INFO, "relay365.spool.schema_version")
    for _ in range(2):
        spool = SqliteSpool(tmp_path / "spool")
        await spool.open()
        [entry, held] = await spool.list()
        assert [r.state.value for r in entry.recipients] == ["queued", "deferred", "delivered"]
        assert [r.attempts for r in entry.recipients] == [0, 1, 1] and held.held
        await spool.close()
    assert len([r for r in caplog.records if "upgraded" in r.getMessage()]) == 1
    newer(tmp_path / "spool" / "queue.db", 3)
    with pytest.raises(SchemaVersionError) as e:
        await SqliteSpool(tmp_path / "spool").open()
    assert (e.value.found, e.value.supported) == (3, sqlite_schema.SCHEMA.version)


def test_a_failing_upgrade_step_leaves_the_old_database_as_it_was(tmp_path: Path) -> None:
    """Every step runs in one transaction with the version: a failure rolls all of it back."""
    db = first_release_spool(tmp_path / "spool")

    def boom(conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    steps = {0: sqlite_schema.SCHEMA.steps[0], 1: boom}
    schema = Schema(what="the queue", version=2, steps=steps, history={})
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError):
            migrate(conn, schema, db)
        assert conn.execute("PRAGMA user_version").fetchone() == (0,)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(messages)")]
        assert "lease_owner" not in columns  # step 0 -> 1 was rolled back with the failing step
    finally:
        conn.close()


async def test_a_first_tracking_log_is_upgraded_and_a_newer_one_refused(tmp_path: Path) -> None:
    """The first tracking log's events_at index (on ``at`` alone) is rebuilt on (at, kind); its events
    stay searchable. A tracking.db of a newer relay365 is refused, saying it may be moved aside."""
    path = first_tracking_log(tmp_path / "tracking.db", [(time.time(), "delivered", "Q1", "a@contoso.com")])
    with sqlite3.connect(path) as conn:
        assert index_columns(conn, "events_at") == ("at",)
    conn.close()
    async with SqliteTrackingLog(path) as tracking:
        page = await tracking.search(TraceQuery(recipient="a@contoso.com"))
        assert [(e.queue_id, e.kind.value) for e in page.events] == [("Q1", "delivered")]
    with sqlite3.connect(path) as conn:
        assert index_columns(conn, "events_at") == ("at", "kind")
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)
    conn.close()
    before = newer(path, 5)
    with pytest.raises(SchemaVersionError, match=r"move tracking\.db"):
        await SqliteTrackingLog(path).open(purge_every=None)
    assert sha([path]) == before


def test_config_check_names_a_newer_tracking_log(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    path = first_tracking_log(tmp_path / "spool" / "tracking.db", [])
    newer(path, 3)
    r = run_cli("config", "check", str(write_config(tmp_path, transport=[smarthost_cfg(9)])))
    text = " ".join((r.stdout + r.stderr).split())
    assert r.returncode != 0 and "tracking.path:" in text and "schema version 3" in text, text
