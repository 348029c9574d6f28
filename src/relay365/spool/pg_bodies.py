"""The PostgreSQL spool's message bodies: chunks of ``bodies`` (queue id, seq, bytea), written while DATA
streams in and read back chunk by chunk, so no node ever holds a whole message twice while receiving
or streaming it.

Why a chunk table and not large objects: measured on this machine (bench/bench_pg.py, a 35 MB body
in 256 KB pieces), chunk rows write at 128 MB/s and read at 357 MB/s, a large object at 56 MB/s and
319 MB/s; and a chunk table needs no ``lo_unlink`` bookkeeping (a deleted message cannot leave an
orphaned large object behind), is copied by logical replication like any table, and its rows are
removed in the same transaction as the queue entry. Chunks are stored uncompressed (``STORAGE
EXTERNAL``: attachments are compressed already).

Receiving: ``write`` only appends to a list; once ``SPILL`` bytes wait, ``drain`` writes them as one
chunk (the first one also registers the message in ``incoming`` under its owner, so ``recover`` can
remove the chunks of an owner that died mid-DATA). Those writes commit without waiting for the WAL
flush (``synchronous_commit = off`` for that transaction): they promise nothing, and the final
``commit``, which does wait, flushes the WAL up to and including them (the WAL is one sequence).
A message that never spilled is queued with one statement: its only chunk, the row, its recipients
and the NOTIFY, in one round trip and one WAL flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from psycopg import AsyncConnection

from relay365.errors import SpoolIOError
from relay365.spool import pg_rows as rows
from relay365.spool.model import Envelope, new_queue_id
from relay365.spool.pg_connect import mapped

log = logging.getLogger(__name__)
Conn = AsyncConnection[Any]
T = TypeVar("T")


class BodyHost(Protocol):
    """What a message being received needs of its spool (``PgSpool``): no import of it, no cycle."""

    def now(self) -> float: ...

    async def statement(self, fn: Callable[[Conn], Awaitable[T]]) -> T: ...

    async def transaction(self, fn: Callable[[Conn], Awaitable[T]], *, isolation: str = "") -> T: ...

    def payload(self, kind: str, generation: int = 0) -> str: ...

    def changed(self, kind: str = "", generation: int = 0) -> None: ...

    async def ensure_owner(self, owner: str | None = None) -> str: ...


CHUNK = 256 * 1024  # bytes per stored chunk (DSNs and copies); received chunks are at least SPILL


def split(body: bytes, size: int = CHUNK) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)] or []


async def insert_chunks_tx(conn: Conn, queue_id: str, chunks: list[bytes], first_seq: int = 0) -> None:
    if chunks:
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO relay365.bodies (queue_id, seq, chunk) VALUES (%s, %s, %b)",
                [(queue_id, first_seq + i, c) for i, c in enumerate(chunks)],
            )


class PgIncoming:
    """One message being received into ``bodies``."""

    SPILL = 256 * 1024

    def __init__(self, spool: BodyHost) -> None:
        self._spool = spool
        self.queue_id = new_queue_id()
        self.size = 0
        self._parts: list[bytes] = []
        self._buffered = 0
        self._seq = 0
        self._spilled = False
        self._done = False
        self._lock = asyncio.Lock()

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self._buffered += len(data)
        self.size += len(data)

    def _take(self) -> bytes:
        parts, self._parts, self._buffered = self._parts, [], 0
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def drain(self) -> None:
        if self._done:
            raise SpoolIOError(f"message {self.queue_id} was aborted")
        if self._buffered >= self.SPILL:
            async with self._lock:
                await self._spill(self._take())

    async def _spill(self, chunk: bytes) -> None:
        owner = await self._spool.ensure_owner()
        first = not self._spilled
        seq = self._seq

        async def write(conn: Conn) -> None:
            await conn.execute("SET LOCAL synchronous_commit TO off")
            if first:
                await conn.execute(
                    "INSERT INTO relay365.incoming (queue_id, owner) VALUES (%s, %s)", (self.queue_id, owner)
                )
            await insert_chunks_tx(conn, self.queue_id, [chunk], seq)

        await self._spool.transaction(write)
        self._spilled = True
        self._seq += 1

    async def commit(self, envelope: Envelope) -> str:
        if self._done:
            raise SpoolIOError(f"message {self.queue_id} was aborted")
        try:
            await asyncio.shield(self._commit(envelope))
        except BaseException:
            await self.abort()
            raise
        self._done = True
        self._spool.changed("new")
        return self.queue_id

    async def _commit(self, envelope: Envelope) -> None:
        async with self._lock:
            last = self._take()
            params = rows.insert_params(self.queue_id, envelope, self.size, self._spool.now())
            params["payload"] = self._spool.payload("new")
            if not self._spilled:
                params |= {"seq": 0, "body": last}
                sql = rows.insert_sql(with_body=bool(last), notify="new")
                await self._spool.statement(lambda conn: conn.execute(sql.encode(), params))
                return

            async def finish(conn: Conn) -> None:
                cur = await conn.execute(
                    "DELETE FROM relay365.incoming WHERE queue_id = %s", (self.queue_id,)
                )
                if cur.rowcount != 1:  # another node took this node for dead and removed the chunks
                    raise SpoolIOError(
                        f"message {self.queue_id}: its stored chunks were removed (the database connection"
                        " was lost long enough for another node to take this one for dead)"
                    )
                await insert_chunks_tx(conn, self.queue_id, [last] if last else [], self._seq)
                await conn.execute(rows.insert_sql(with_body=False, notify="new").encode(), params)

            await self._spool.transaction(finish)

    async def abort(self) -> None:
        """Never raises: what cannot be removed now belongs to this owner and goes at its next
        ``recover`` (or another node's, once this one is gone)."""
        self._done = True
        self._parts, self._buffered = [], 0
        if not self._spilled:
            return
        self._spilled = False

        async def remove(conn: Conn) -> None:
            await conn.execute("DELETE FROM relay365.incoming WHERE queue_id = %s", (self.queue_id,))
            # Only if no entry has them: a commit whose reply was lost may have been committed after all.
            await conn.execute(
                "DELETE FROM relay365.bodies WHERE queue_id = %s"
                " AND NOT EXISTS (SELECT 1 FROM relay365.messages WHERE queue_id = %s)",
                (self.queue_id, self.queue_id),
            )

        try:
            await self._spool.transaction(remove)
        except Exception as e:  # (a SpoolError, or a closed spool)
            log.warning("could not remove aborted message %s now: %s", self.queue_id, e)


class PgBodyReader:
    """A stored body: its chunks' sizes are read at open, the chunks themselves when needed (each
    with a connection of its own from the pool, so a slow upstream holds no database connection)."""

    def __init__(
        self,
        queue_id: str,
        sizes: list[int],
        run: Callable[[Callable[[Conn], Awaitable[Any]]], Awaitable[Any]],
    ) -> None:
        self._queue_id = queue_id
        self._sizes = sizes
        self._run = run
        self.size = sum(sizes)
        self._pos = 0
        self._seq = 0  # the chunk holding self._pos
        self._offset = 0  # where that chunk starts in the body
        self._chunk: memoryview | None = None

    def _error(self, why: str) -> SpoolIOError:
        return SpoolIOError(f"cannot read message {self._queue_id}: {why}")

    async def _fetch(self, seq: int) -> memoryview:
        async def get(conn: Conn) -> bytes | None:
            cur = await conn.cursor(binary=True).execute(
                "SELECT chunk FROM relay365.bodies WHERE queue_id = %s AND seq = %s", (self._queue_id, seq)
            )
            row = await cur.fetchone()
            return None if row is None else bytes(row[0])

        data = await self._run(get)
        if data is None or len(data) != self._sizes[seq]:
            raise self._error(f"chunk {seq} is missing or changed (the message was deleted?)")
        return memoryview(data)

    async def read(self, n: int = -1) -> bytes:
        want = self.size - self._pos if n < 0 else min(n, max(0, self.size - self._pos))
        parts: list[bytes] = []
        while want > 0:
            if self._chunk is None:
                self._chunk = await self._fetch(self._seq)
            start = self._pos - self._offset
            piece = self._chunk[start : start + want]
            parts.append(bytes(piece))
            self._pos += len(piece)
            want -= len(piece)
            if self._pos - self._offset >= len(self._chunk):  # this chunk is used up
                self._offset += len(self._chunk)
                self._seq += 1
                self._chunk = None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def chunks(self, n: int = 256 * 1024) -> AsyncIterator[bytes]:
        while chunk := await self.read(n):
            yield chunk

    async def read_all(self) -> bytes:
        """The whole body, filled chunk by chunk into one buffer (one streaming query)."""
        buf = bytearray(self.size)

        async def fill(conn: Conn) -> int:
            at = 0
            async with conn.cursor(binary=True) as cur:
                async for (chunk,) in cur.stream(
                    "SELECT chunk FROM relay365.bodies WHERE queue_id = %s ORDER BY seq", (self._queue_id,)
                ):
                    end = at + len(chunk)
                    if end > self.size:
                        break
                    buf[at:end] = chunk
                    at = end
            return at

        got = await self._run(fill)
        if got != self.size:
            raise self._error(f"{got} of {self.size} bytes stored (the message was deleted?)")
        self._pos = self.size
        return bytes(buf)

    def fileno(self) -> int | None:
        return None


@contextlib.asynccontextmanager
async def open_body(
    queue_id: str, run: Callable[[Callable[[Conn], Awaitable[Any]]], Awaitable[Any]]
) -> AsyncIterator[PgBodyReader]:
    async def sizes(conn: Conn) -> tuple[list[tuple[int, int]], bool]:
        cur = await conn.execute(
            "SELECT seq, octet_length(chunk) FROM relay365.bodies WHERE queue_id = %s ORDER BY seq",
            (queue_id,),
        )
        found = [(int(seq), int(n)) for seq, n in await cur.fetchall()]
        if found:
            return found, True
        cur = await conn.execute("SELECT 1 FROM relay365.messages WHERE queue_id = %s", (queue_id,))
        return [], (await cur.fetchone()) is not None

    with mapped(f"cannot read message {queue_id}"):
        found, exists = await run(sizes)
    if not exists:
        raise SpoolIOError(f"cannot read message {queue_id}: no such message in the spool")
    if [seq for seq, _ in found] != list(range(len(found))):
        raise SpoolIOError(f"cannot read message {queue_id}: chunks missing")
    yield PgBodyReader(queue_id, [n for _, n in found], run)
