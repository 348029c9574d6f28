"""Moving a queue from the SQLite spool to PostgreSQL (``relay365 spool copy``), without loss.

Every message is copied in one transaction of its own (body chunks, row, recipients with their exact
states, attempts, due times, last replies and transports, the hold), so an interrupted copy leaves
each message complete or absent, and running the copy again finishes it: messages already in the
target are skipped. Pacing windows of the last 24 hours come along (the same event is never copied
twice), so the mailboxes' limits still hold right after the move. Claims are not copied (nobody
delivers from the old spool any more). The copy refuses to run while a relay365 still works on the
SQLite spool (an owner lock is held): stop it first, so nothing changes under the copy.

After the copy every message is read back from PostgreSQL and compared with the source (envelope,
recipients, size and the body's bytes); a difference raises ``SpoolIOError``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from typing import Any

from psycopg import AsyncConnection

from relay365.errors import SpoolIOError
from relay365.spool import pg_rows as rows
from relay365.spool.contract import Spool
from relay365.spool.model import QueueEntry
from relay365.spool.pg_bodies import CHUNK, insert_chunks_tx
from relay365.spool.postgres import PgSpool
from relay365.spool.sqlite import SqliteSpool
from relay365.spool.sqlite_owners import live_owners

Conn = AsyncConnection[Any]


@dataclass(frozen=True, slots=True)
class CopyReport:
    copied: int
    skipped: int  # already in the target (an earlier run)
    bytes: int
    pace_events: int


async def _digest(spool: Spool, entry: QueueEntry) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    async with spool.body(entry) as reader:
        async for chunk in reader.chunks(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _comparable(e: QueueEntry) -> QueueEntry:
    return replace(e, body_ref="", claimed_by="", claimed_until=0.0)


async def _copy_one(source: SqliteSpool, target: PgSpool, entry: QueueEntry) -> int:
    async def write(conn: Conn) -> int:
        size, seq = 0, 0
        async with source.body(entry) as reader:
            async for chunk in reader.chunks(CHUNK):
                await insert_chunks_tx(conn, entry.queue_id, [chunk], seq)
                seq += 1
                size += len(chunk)
        if size != entry.size:
            raise SpoolIOError(f"{entry.queue_id}: the body has {size} bytes, the queue says {entry.size}")
        params = rows.insert_params(
            entry.queue_id, entry.envelope, entry.size, entry.received_at, stuffed=entry.stuffed
        )
        await conn.execute(rows.insert_sql(with_body=False, notify=None).encode(), params)
        async with conn.cursor() as cur:
            await cur.executemany(
                "UPDATE relay365.recipients SET state = %s, attempts = %s, next_attempt = %s,"
                " last_reply = %s, transport = %s WHERE queue_id = %s AND pos = %s",
                [
                    (r.state.value, r.attempts, r.next_attempt, r.last_reply, r.transport, entry.queue_id, i)
                    for i, r in enumerate(entry.recipients)
                ],
            )
        await conn.execute(
            "UPDATE relay365.messages m SET held = %s, next_due = (SELECT min(x.next_attempt)"
            " FROM relay365.recipients x WHERE x.queue_id = m.queue_id AND x.state IN ('queued', 'deferred'))"
            " WHERE queue_id = %s",
            (entry.held, entry.queue_id),
        )
        return size

    return await target.transaction(write)


async def copy_sqlite_to_pg(source: SqliteSpool, target: PgSpool, *, now: float | None = None) -> CopyReport:
    """Both spools opened (the source not recovered: nobody may work on it)."""
    busy = live_owners(source.owners_dir)
    if busy:
        raise SpoolIOError(
            f"relay365 still works on {source.directory} (owner {busy[0]} is alive): stop it before copying"
        )
    now = time.time() if now is None else now
    existing = {e.queue_id for e in await target.list()}
    copied = skipped = total = 0
    entries = await source.list()
    for entry in entries:
        if entry.queue_id in existing:
            skipped += 1
            continue
        total += await _copy_one(source, target, entry)
        copied += 1
    events = await source.pace_events(now - rows.PACING_HISTORY)

    async def pacing(conn: Conn) -> int:
        added = 0
        for e in events:
            cur = await conn.execute(
                "INSERT INTO relay365.pacing (key, at, recipients) SELECT %s, %s, %s WHERE NOT EXISTS"
                " (SELECT 1 FROM relay365.pacing WHERE key = %s AND at = %s AND recipients = %s)",
                (e.key, e.at, e.recipients, e.key, e.at, e.recipients),
            )
            added += cur.rowcount
        return added

    added = await target.transaction(pacing)
    # Read everything back and compare: the copy is done only when the target holds the same.
    for entry in entries:
        got = await target.get(entry.queue_id)
        if _comparable(got) != _comparable(entry) or await _digest(target, got) != await _digest(
            source, entry
        ):
            raise SpoolIOError(f"{entry.queue_id}: the copy differs from the source; nothing was removed")
    return CopyReport(copied, skipped, total, added)
