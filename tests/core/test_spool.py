"""The SQLite spool: a queue entry is complete or absent, states survive a restart, admin operations."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from pathlib import Path

import pytest

from relay365.errors import QueueEntryNotFound
from relay365.spool.model import Envelope, RcptState, RecipientUpdate
from relay365.spool.sqlite import SqliteSpool
from tests.support import (
    T0,
    Clock,
    body_files,
    body_of,
    closed_port,
    make_settings,
    running_relay,
    send_message,
    smarthost,
)

ENV = Envelope(
    mail_from="scanner@contoso.com",
    rcpt_tos=("a@contoso.com", "b@contoso.com", "c@contoso.com", "d@contoso.com"),
    device="printer",
    peer="127.0.0.1",
    listener="lan",
)
BODY = b"Subject: report\r\n\r\n" + b"line of text\r\n" * 1000


async def open_spool(
    directory: Path, *, recover: bool = True, clock: Clock | None = None, owner: str = "server"
) -> SqliteSpool:
    """``recover``: open as the server does at start (an owner that cleans up after dead ones);
    else as ``relay365 queue`` does (no owner, touches nothing)."""
    spool = SqliteSpool(directory, clock=clock or Clock())
    await spool.open()
    if recover:
        await spool.recover(owner)
    return spool


async def claim_all(spool: SqliteSpool, now: float = T0, owner: str = "server") -> list[str]:
    return [e.queue_id for e in await spool.claim(owner=owner, now=now, limit=100, lease=60)]


async def test_leftover_body_without_row_is_removed_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = await open_spool(tmp_path, owner="server-1")
    kept = await spool.enqueue(ENV, BODY)
    # A crash during DATA: the body file is (partly) written, the row never was.
    crashed = spool.incoming()
    crashed.write(b"Subject: half\r\n\r\n" + b"only the first part of the mes" * 5000)
    await crashed.drain()  # over SPILL: the first part is written to the file
    crashed_path = crashed.path
    assert crashed_path.read_bytes().startswith(b"Subject: half")
    # And a stray file from a crash between fsync and row insert.
    (spool.messages_dir / "0193A4F2C81DDEADBEEF").write_bytes(b"Subject: x\r\n\r\nwhole\r\n")
    assert crashed._fd is not None
    os.close(crashed._fd)  # the crash: the process is gone (its owner lock with it), the file stays
    crashed._fd = None
    await spool.close()

    # The CLI opens without recovery (the server may be running): nothing is touched.
    spool = await open_spool(tmp_path, recover=False)
    assert crashed_path.exists()
    await spool.close()

    with caplog.at_level(logging.WARNING, logger="relay365.spool.sqlite"):
        spool = await open_spool(tmp_path, recover=True, owner="server-2")
    try:
        assert "removed 2 incomplete message file(s)" in caplog.text
        assert body_files(spool.messages_dir) == [kept]
        assert not crashed_path.exists()
        [entry] = await spool.list()
        assert entry.queue_id == kept and entry.size == len(BODY)
        assert await body_of(spool, entry) == BODY
    finally:
        await spool.close()


async def test_abort_leaves_nothing(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    try:
        msg = spool.incoming()
        msg.write(BODY)
        await msg.abort()
        assert body_files(spool.messages_dir) == []
        assert await spool.list() == []
    finally:
        await spool.close()


async def test_recipient_states_survive_restart(tmp_path: Path) -> None:
    clock = Clock()
    spool = await open_spool(tmp_path, clock=clock)
    qid = await spool.enqueue(ENV, BODY)
    assert await claim_all(spool) == [qid]
    await spool.record(
        qid,
        [
            RecipientUpdate("a@contoso.com", RcptState.DELIVERED, "250 2.0.0 Ok"),
            RecipientUpdate("b@contoso.com", RcptState.DEFERRED, "450 4.2.0 busy", T0 + 300),
            RecipientUpdate("c@contoso.com", RcptState.BOUNCED, "550 5.1.1 unknown"),
        ],
        owner="server",
    )
    await spool.hold(qid, True)
    await spool.close()

    spool = await open_spool(tmp_path, clock=clock, owner="server-2")
    try:
        entry = await spool.get(qid)
        assert entry.held is True
        assert entry.envelope == ENV
        assert entry.received_at == T0
        got = {r.rcpt: (r.state, r.attempts, r.next_attempt, r.last_reply) for r in entry.recipients}
        assert got == {
            "a@contoso.com": (RcptState.DELIVERED, 1, 0.0, "250 2.0.0 Ok"),
            "b@contoso.com": (RcptState.DEFERRED, 1, T0 + 300, "450 4.2.0 busy"),
            "c@contoso.com": (RcptState.BOUNCED, 1, 0.0, "550 5.1.1 unknown"),
            "d@contoso.com": (RcptState.QUEUED, 0, T0, ""),
        }
        assert await body_of(spool, entry) == BODY
        path = spool.body_file(entry)
        await spool.hold(qid, False)
        # A final state is final: a late update does not resurrect a delivered recipient.
        assert await claim_all(spool, T0 + 300, "server-2") == [qid]
        await spool.record(
            qid, [RecipientUpdate("a@contoso.com", RcptState.DEFERRED, "451 x", T0)], owner="server-2"
        )
        assert (await spool.get(qid)).recipients[0].state is RcptState.DELIVERED
        # The last open recipients finish: the entry and its body go away together.
        assert await claim_all(spool, T0 + 300, "server-2") == [qid]
        await spool.record(
            qid,
            [
                RecipientUpdate("b@contoso.com", RcptState.DELIVERED, "250 ok"),
                RecipientUpdate("d@contoso.com", RcptState.DELIVERED, "250 ok"),
            ],
            owner="server-2",
        )
        assert await spool.list() == []
        assert not path.exists()
    finally:
        await spool.close()


async def test_hold_release_retry_delete(tmp_path: Path) -> None:
    clock = Clock()
    spool = await open_spool(tmp_path, clock=clock)
    try:
        q1 = await spool.enqueue(ENV, BODY)
        q2 = await spool.enqueue(ENV, BODY)
        await spool.hold(q1, True)
        assert await claim_all(spool) == [q2]  # a held message is not claimed
        assert await claim_all(spool) == []  # nor one claimed already
        await spool.release(q2, owner="server")
        await spool.hold(q1, False)
        assert sorted(await claim_all(spool, T0 + 10)) == sorted([q1, q2])

        later = T0 + 3600
        for q in (q1, q2):
            await spool.record(
                q,
                [RecipientUpdate(r, RcptState.DEFERRED, "421 4.3.2 busy", later) for r in ENV.rcpt_tos],
                owner="server",
            )
        assert await claim_all(spool, T0 + 10) == []  # deferred: not due before ``later``
        assert await spool.next_due_time() == later
        await spool.retry(q2, T0 + 5)
        assert {r.next_attempt for r in (await spool.get(q2)).recipients} == {T0 + 5}
        assert await spool.next_due_time() == T0 + 5
        assert await claim_all(spool, T0 + 10) == [q2]

        path = spool.body_file(await spool.get(q1))
        await spool.delete(q1)
        assert not path.exists()
        assert [e.queue_id for e in await spool.list()] == [q2]
        for op in (spool.delete(q1), spool.hold(q1, True), spool.retry(q1, T0), spool.get(q1)):
            with pytest.raises(QueueEntryNotFound):
                await op
    finally:
        await spool.close()


async def test_two_processes_share_the_spool(tmp_path: Path) -> None:
    """The CLI opens the same spool as the running server (WAL); both see each other's writes."""
    server = await open_spool(tmp_path)
    admin = await open_spool(tmp_path, recover=False)
    assert admin.owner is None  # the CLI is nobody's owner: it holds no lock and claims nothing
    try:
        qid = await server.enqueue(ENV, BODY)
        assert [e.queue_id for e in await admin.list()] == [qid]
        await admin.hold(qid, True)
        assert (await server.get(qid)).held
    finally:
        await admin.close()
        await server.close()


async def test_relay_restart_keeps_queue(tmp_path: Path) -> None:
    """Messages accepted by a relay (its upstream is down: nothing is delivered) survive a restart."""
    settings = make_settings(
        tmp_path,
        listener=[{"name": "lan", "port": 0, "tls": "none"}],
        transport=[smarthost(closed_port())],
    )
    ids = []
    async with running_relay(settings) as relay:
        for i in range(3):
            body = f"Subject: n{i}\r\n\r\nbody {i}\r\n".encode()
            ids.append(await asyncio.to_thread(send_message, relay.ports["lan"], body=body))
    async with running_relay(settings) as relay:
        entries = {e.queue_id: e for e in await relay.spool.list()}
        assert sorted(entries) == sorted(ids)
        for i, qid in enumerate(ids):
            assert (await body_of(relay.spool, entries[qid])).endswith(f"body {i}\r\n".encode())
            assert entries[qid].recipients[0].state in (RcptState.QUEUED, RcptState.DEFERRED)


async def test_spool_is_private_to_the_service_user(tmp_path: Path) -> None:
    """Envelopes live in queue.db and its -wal/-shm files, bodies in messages/: nothing for others."""
    spool = await open_spool(tmp_path / "spool")
    try:
        await spool.enqueue(ENV, BODY)
        modes = {p.name: p.stat().st_mode & 0o777 for p in [spool.directory, *spool.directory.rglob("*")]}
    finally:
        await spool.close()
    assert {"queue.db", "queue.db-wal", "queue.db-shm", "messages", "owners", "server.lock", "spool"} <= set(
        modes
    )
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes


async def test_a_queue_from_before_owners_and_claims_is_upgraded_and_delivered(tmp_path: Path) -> None:
    """queue.db without the body_dir/lease columns and bodies at messages/<queue id> (relay365 before
    the spool contract): opened in place, read, claimed, recorded; its crash leftovers still go."""
    directory = tmp_path / "spool"
    (directory / "messages").mkdir(parents=True)
    conn = sqlite3.connect(directory / "queue.db", isolation_level=None)
    conn.executescript(OLD_SCHEMA)
    conn.execute(
        "INSERT INTO messages VALUES ('0193A4F2C81D7B3E9A1', 's@contoso.com', 'printer', '10.0.0.9',"
        " 'lan', 0, 0, ?, ?, 0)",
        (len(BODY), T0),
    )
    conn.execute("INSERT INTO recipients (queue_id, pos, rcpt, state, next_attempt) VALUES (?,0,?,?,?)",
                 ("0193A4F2C81D7B3E9A1", "a@contoso.com", "queued", T0))  # fmt: skip
    conn.close()
    (directory / "messages" / "0193A4F2C81D7B3E9A1").write_bytes(BODY)
    (directory / "messages" / "0193A4F2C81DDEADBEEF").write_bytes(b"half")  # its crash leftover

    spool = await open_spool(directory)
    try:
        [entry] = await spool.list()
        assert entry.queue_id == "0193A4F2C81D7B3E9A1" and entry.body_ref == "" and entry.claimed_by == ""
        assert await body_of(spool, entry) == BODY
        assert body_files(spool.messages_dir) == ["0193A4F2C81D7B3E9A1"]  # the leftover is gone
        assert await claim_all(spool) == [entry.queue_id]
        await spool.record(
            entry.queue_id, [RecipientUpdate("a@contoso.com", RcptState.DELIVERED, "250 ok")], owner="server"
        )
        assert await spool.list() == [] and body_files(spool.messages_dir) == []
    finally:
        await spool.close()


OLD_SCHEMA = """
CREATE TABLE messages (queue_id TEXT PRIMARY KEY, mail_from TEXT NOT NULL, device TEXT NOT NULL,
    peer TEXT NOT NULL, listener TEXT NOT NULL, smtputf8 INTEGER NOT NULL, is_dsn INTEGER NOT NULL,
    size INTEGER NOT NULL, received_at REAL NOT NULL, held INTEGER NOT NULL DEFAULT 0);
CREATE TABLE recipients (queue_id TEXT NOT NULL REFERENCES messages(queue_id) ON DELETE CASCADE,
    pos INTEGER NOT NULL, rcpt TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL, last_reply TEXT NOT NULL DEFAULT '', PRIMARY KEY (queue_id, pos));
CREATE INDEX recipients_due ON recipients(state, next_attempt);
CREATE TABLE pacing (key TEXT NOT NULL, at REAL NOT NULL, recipients INTEGER NOT NULL);
CREATE INDEX pacing_at ON pacing(at);
"""
