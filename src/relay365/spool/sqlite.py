"""The embedded spool: message bodies as files, envelopes and recipient states in SQLite (WAL).

Durability (RFC 5321 section 6.1: once 250 is sent, the relay owns the message):
1. ingress streams DATA into ``messages/<queue id>`` (mode 0600) and the file is fsynced;
2. a group commit fsyncs the ``messages`` directory once, then inserts the rows of every message
   waiting in the batch in one SQLite transaction (``synchronous=FULL``: the WAL is fsynced);
3. only then does ingress answer ``250 2.0.0 Ok: queued as <id>``.
The row is the commit point: a body file without a row is a crash leftover and is removed when the
server starts (``open(recover=True)``). A queue entry is therefore complete or absent.

Free-space reserve (Postfix's ``queue_minfree``): incoming messages may not bring the file system's
free space below ``min_free`` bytes (``SpoolFullError``, ingress answers ``452 4.3.1``), so the
queue's own bookkeeping (delivery outcomes, DSNs, which do not check the reserve) can still be
written when devices have filled the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from relay365.errors import QueueEntryNotFound, SpoolError, SpoolFullError, SpoolIOError
from relay365.spool.filters import make_due, select_page
from relay365.spool.model import (
    FINAL_STATES,
    Bounce,
    Envelope,
    PaceEvent,
    QueueEntry,
    QueueFilter,
    QueuePage,
    QueueStats,
    RcptState,
    Recipient,
    RecipientUpdate,
    new_queue_id,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    queue_id TEXT PRIMARY KEY,
    mail_from TEXT NOT NULL,
    device TEXT NOT NULL,
    peer TEXT NOT NULL,
    listener TEXT NOT NULL,
    smtputf8 INTEGER NOT NULL,
    is_dsn INTEGER NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    held INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS recipients (
    queue_id TEXT NOT NULL REFERENCES messages(queue_id) ON DELETE CASCADE,
    pos INTEGER NOT NULL,
    rcpt TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_reply TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (queue_id, pos)
);
CREATE INDEX IF NOT EXISTS recipients_due ON recipients(state, next_attempt);
CREATE TABLE IF NOT EXISTS pacing (key TEXT NOT NULL, at REAL NOT NULL, recipients INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS pacing_at ON pacing(at);
"""
_IOV_MAX = 1024  # Linux UIO_MAXIOV: buffers per writev call
PACING_HISTORY = 86_400.0  # the longest pacing window: 24 hours (recipients per rolling day)
_OPEN_STATES = (RcptState.QUEUED.value, RcptState.DEFERRED.value)


def spool_error(e: BaseException) -> SpoolError:
    """Map an OS or SQLite error to the spool's own errors (disk full vs any other I/O error)."""
    if isinstance(e, SpoolError):
        return e
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFullError(f"spool full: {e.strerror}")
    if isinstance(e, sqlite3.Error) and "full" in str(e):
        return SpoolFullError(f"spool full: {e}")
    return SpoolIOError(f"spool I/O error: {e}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SqliteIncoming:
    """One message being received.

    ``write`` only appends to a buffer (no system call on the event loop); ``drain`` hands the buffer
    to an I/O thread once it holds ``SPILL`` bytes, so memory per message stays bounded; ``commit``
    writes the rest, fsyncs and inserts the row. A small message is thus created, written and synced
    in one trip to an I/O thread, and the event loop never waits on the file system's locks.
    """

    SPILL = 128 * 1024

    def __init__(self, spool: SqliteSpool, *, keep_reserve: bool = True) -> None:
        self._spool = spool
        self._keep_reserve = keep_reserve
        self.queue_id = new_queue_id()
        self.path = spool.messages_dir / self.queue_id
        self.size = 0
        self._parts: list[bytes] = []  # kept as received and written with writev: no copies here
        self._buffered = 0
        self._fd: int | None = None
        self._closed = False
        self._lock = threading.Lock()  # one file operation at a time, even after a cancellation

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self._buffered += len(data)
        self.size += len(data)

    def _take(self) -> list[bytes]:
        parts, self._parts, self._buffered = self._parts, [], 0
        return parts

    async def drain(self) -> None:
        if self._buffered >= self.SPILL:
            parts = self._take()
            await self._spool.run_io(lambda: self._spill(parts))

    def _spill(self, parts: list[bytes]) -> None:
        """In an I/O thread: create the file on first use and append ``parts``."""
        with self._lock:
            if self._closed:
                raise SpoolIOError(f"message {self.queue_id} was aborted")
            if self._keep_reserve:
                self._spool.check_room(sum(len(p) for p in parts))
            try:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                for i in range(0, len(parts), _IOV_MAX):
                    group = parts[i : i + _IOV_MAX]
                    written = os.writev(self._fd, group)
                    total = sum(len(p) for p in group)
                    if written < total:  # a short write: finish the rest plainly
                        view = memoryview(b"".join(group))[written:]
                        while view:
                            view = view[os.write(self._fd, view) :]
            except OSError as e:
                raise spool_error(e) from e

    def _sync(self) -> None:
        self._spill(self._take())
        with self._lock:
            assert self._fd is not None
            try:
                os.fsync(self._fd)
            except OSError as e:
                raise spool_error(e) from e
            finally:
                self._closed = True
                os.close(self._fd)
                self._fd = None

    async def commit(self, envelope: Envelope) -> str:
        try:
            await self._spool.run_io(self._sync)
            await self._spool.insert(self.queue_id, envelope, self.size)
        except BaseException:
            await self.abort()
            raise
        return self.queue_id

    async def abort(self) -> None:
        self._take()
        with self._lock:
            self._closed = True
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None
        try:
            self.path.unlink(missing_ok=True)
        except OSError as e:  # the directory is gone or read-only: a leftover is removed at start
            log.warning("could not remove aborted message %s: %s", self.queue_id, e)


class SqliteSpool:
    """The default spool. All SQLite work runs on one dedicated thread, serialised."""

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.time, min_free: int = 0) -> None:
        self.directory = directory
        self.min_free = min_free
        self.messages_dir = directory / "messages"
        self.db_path = directory / "queue.db"
        self._clock = clock
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="spool-db")
        self._io = ThreadPoolExecutor(8, thread_name_prefix="spool-io")
        self._conn: sqlite3.Connection | None = None
        self._pending: list[tuple[str, Envelope, int, asyncio.Future[None]]] = []
        self._pending_lock = threading.Lock()
        self._flushing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- plumbing ------------------------------------------------------------------------------
    async def _db(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._conn is not None, "spool is not open"
            try:
                return fn(self._conn)
            except (OSError, sqlite3.Error) as e:
                raise spool_error(e) from e

        return await asyncio.get_running_loop().run_in_executor(self._db_thread, call)

    async def run_io(self, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._io, fn)
        except OSError as e:
            raise spool_error(e) from e

    async def open(self, *, recover: bool = False) -> None:
        self._loop = asyncio.get_running_loop()
        # Envelopes sit in queue.db and its -wal/-shm files: the spool is for the service user only.
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.messages_dir.mkdir(exist_ok=True, mode=0o700)
        await asyncio.get_running_loop().run_in_executor(self._db_thread, self._connect)
        if recover:
            removed = await self._db(self._remove_orphans)
            if removed:
                log.warning("spool recovery: removed %d incomplete message file(s)", removed)

    def _connect(self) -> None:
        # SQLite gives the -wal and -shm files the database file's mode, so create it 0600 first.
        os.close(os.open(self.db_path, os.O_RDWR | os.O_CREAT, 0o600))
        for suffix in ("", "-wal", "-shm"):
            path = self.db_path.with_name(self.db_path.name + suffix)
            if path.exists():
                os.chmod(path, 0o600)
        conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.executescript(_SCHEMA)
        self._conn = conn

    def _remove_orphans(self, conn: sqlite3.Connection) -> int:
        known = {row[0] for row in conn.execute("SELECT queue_id FROM messages")}
        removed = 0
        for p in self.messages_dir.iterdir():
            if p.name not in known:
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._db_thread, shut)
        self._db_thread.shutdown(wait=True)
        self._io.shutdown(wait=True)

    # -- receiving -------------------------------------------------------------------------------
    def check_room(self, size: int = 0) -> None:
        """``SpoolFullError`` if ``size`` more bytes would leave less than ``min_free`` free."""
        if self.min_free <= 0 and size <= 0:
            return
        try:
            st = os.statvfs(self.directory)
        except OSError as e:
            raise spool_error(e) from e
        free = st.f_bavail * st.f_frsize
        if free - size < self.min_free:
            raise SpoolFullError(
                f"spool full: {free // 1024} KiB free, {size // 1024} KiB more would cut into the"
                f" {self.min_free // 1024} KiB reserved for the queue's bookkeeping"
            )

    def incoming(self) -> SqliteIncoming:
        self.check_room()
        return SqliteIncoming(self)

    async def enqueue(self, envelope: Envelope, body: bytes) -> str:
        msg = self.incoming()
        msg.write(body)
        return await msg.commit(envelope)

    async def insert(self, queue_id: str, envelope: Envelope, size: int) -> None:
        """Group commit: every message waiting is made durable by one directory fsync + one commit."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._pending_lock:
            self._pending.append((queue_id, envelope, size, fut))
            start = not self._flushing
            self._flushing = True
        if start:
            self._db_thread.submit(self._flush)
        await fut

    def _flush(self) -> None:
        while True:
            with self._pending_lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._flushing = False
                    return
            error: BaseException | None = None
            try:
                fsync_dir(self.messages_dir)
                assert self._conn is not None
                now = self._clock()
                self._write_rows(self._conn, [(q, e, s) for q, e, s, _ in batch], now)
            except (OSError, sqlite3.Error) as e:
                error = spool_error(e)
            for *_, fut in batch:
                fut.get_loop().call_soon_threadsafe(_settle, fut, error)

    @classmethod
    def _write_rows(
        cls, conn: sqlite3.Connection, rows: Sequence[tuple[str, Envelope, int]], now: float
    ) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            cls._insert_rows(conn, rows, now)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    @staticmethod
    def _insert_rows(conn: sqlite3.Connection, rows: Sequence[tuple[str, Envelope, int]], now: float) -> None:
        for queue_id, env, size in rows:
            conn.execute(
                "INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?,0)",
                (
                    queue_id,
                    env.mail_from,
                    env.device,
                    env.peer,
                    env.listener,
                    int(env.smtputf8),
                    int(env.is_dsn),
                    size,
                    now,
                ),
            )
            conn.executemany(
                "INSERT INTO recipients (queue_id, pos, rcpt, state, next_attempt) VALUES (?,?,?,?,?)",
                [(queue_id, i, r, RcptState.QUEUED.value, now) for i, r in enumerate(env.rcpt_tos)],
            )

    # -- delivery --------------------------------------------------------------------------------
    def _entry(self, conn: sqlite3.Connection, queue_id: str) -> QueueEntry:
        row = conn.execute("SELECT * FROM messages WHERE queue_id=?", (queue_id,)).fetchone()
        if row is None:
            raise QueueEntryNotFound(queue_id)
        rcpts = [
            Recipient(r[0], RcptState(r[1]), r[2], r[3], r[4])
            for r in conn.execute(
                "SELECT rcpt, state, attempts, next_attempt, last_reply FROM recipients"
                " WHERE queue_id=? ORDER BY pos",
                (queue_id,),
            )
        ]
        return self._make_entry(row, rcpts)

    def _make_entry(self, row: Sequence[Any], recipients: Sequence[Recipient]) -> QueueEntry:
        rcpts = tuple(recipients)
        env = Envelope(
            mail_from=row[1],
            rcpt_tos=tuple(r.rcpt for r in rcpts),
            device=row[2],
            peer=row[3],
            listener=row[4],
            smtputf8=bool(row[5]),
            is_dsn=bool(row[6]),
        )
        return QueueEntry(row[0], env, row[7], row[8], bool(row[9]), self.messages_dir / row[0], rcpts)

    async def due(self, now: float, *, limit: int, exclude: frozenset[str]) -> list[QueueEntry]:
        def query(conn: sqlite3.Connection) -> list[QueueEntry]:
            ids = conn.execute(
                "SELECT r.queue_id FROM recipients r JOIN messages m USING (queue_id)"
                " WHERE r.state IN (?,?) AND r.next_attempt <= ? AND m.held = 0"
                " GROUP BY r.queue_id ORDER BY MIN(r.next_attempt) LIMIT ?",
                (*_OPEN_STATES, now, limit + len(exclude)),
            ).fetchall()
            wanted = [i for (i,) in ids if i not in exclude][:limit]
            return [self._entry(conn, i) for i in wanted]

        return await self._db(query)

    async def next_due_time(self) -> float | None:
        def query(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT MIN(r.next_attempt) FROM recipients r JOIN messages m USING (queue_id)"
                " WHERE r.state IN (?,?) AND m.held = 0",
                _OPEN_STATES,
            ).fetchone()
            return None if row[0] is None else float(row[0])

        return await self._db(query)

    async def record(
        self,
        queue_id: str,
        updates: Sequence[RecipientUpdate],
        *,
        bounce: Bounce | None = None,
        pace_events: Sequence[PaceEvent] = (),
    ) -> None:
        dsn: SqliteIncoming | None = None
        if bounce is not None:
            dsn = SqliteIncoming(self, keep_reserve=False)  # bookkeeping: may use the reserve
            dsn.write(bounce.body)
            await self.run_io(dsn._sync)

        def write(conn: sqlite3.Connection) -> bool:
            if dsn is not None:
                fsync_dir(self.messages_dir)
            conn.execute("BEGIN IMMEDIATE")
            try:
                for u in updates:
                    conn.execute(
                        "UPDATE recipients SET state=?, attempts=attempts+?, next_attempt=?,"
                        " last_reply=? WHERE queue_id=? AND rcpt=? AND state IN (?,?)",
                        (
                            u.state.value,
                            int(u.counts_attempt),
                            u.next_attempt,
                            u.reply[:1000],
                            queue_id,
                            u.rcpt,
                            *_OPEN_STATES,
                        ),
                    )
                if dsn is not None and bounce is not None:
                    self._insert_rows(conn, [(dsn.queue_id, bounce.envelope, dsn.size)], self._clock())
                if pace_events:
                    conn.executemany(
                        "INSERT INTO pacing VALUES (?,?,?)",
                        [(e.key, e.at, e.recipients) for e in pace_events],
                    )
                    conn.execute("DELETE FROM pacing WHERE at < ?", (self._clock() - PACING_HISTORY,))
                open_left = conn.execute(
                    "SELECT COUNT(*) FROM recipients WHERE queue_id=? AND state NOT IN (?,?)",
                    (queue_id, *(s.value for s in FINAL_STATES)),
                ).fetchone()[0]
                if open_left == 0:
                    conn.execute("DELETE FROM messages WHERE queue_id=?", (queue_id,))
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            return bool(open_left == 0)

        try:
            finished = await self._db(write)
        except BaseException:
            if dsn is not None:
                await dsn.abort()
            raise
        if finished:
            (self.messages_dir / queue_id).unlink(missing_ok=True)

    async def pace_events(self, since: float) -> list[PaceEvent]:
        def query(conn: sqlite3.Connection) -> list[PaceEvent]:
            rows = conn.execute("SELECT key, at, recipients FROM pacing WHERE at >= ?", (since,))
            return [PaceEvent(k, a, n) for k, a, n in rows]

        return await self._db(query)

    # -- administration --------------------------------------------------------------------------
    async def get(self, queue_id: str) -> QueueEntry:
        return await self._db(lambda conn: self._entry(conn, queue_id))

    async def stats(self) -> QueueStats:
        def query(conn: sqlite3.Connection) -> QueueStats:
            counts = {state.value: 0 for state in RcptState}
            for state, n in conn.execute("SELECT state, COUNT(*) FROM recipients GROUP BY state"):
                counts[state] = n
            held = conn.execute("SELECT COUNT(*) FROM messages WHERE held=1").fetchone()[0]
            oldest = conn.execute(
                "SELECT MIN(received_at) FROM messages WHERE queue_id IN"
                " (SELECT queue_id FROM recipients WHERE state IN (?,?))",
                _OPEN_STATES,
            ).fetchone()[0]
            return QueueStats(counts, int(held), oldest)

        return await self._db(query)

    async def query(self, where: QueueFilter, *, limit: int | None) -> QueuePage:
        """Filtered and counted in SQL (filters.py): a count and two queries for the page, whatever
        the size of the queue."""

        def read(conn: sqlite3.Connection) -> QueuePage:
            total, rows, rcpts = select_page(conn, where, limit)
            return QueuePage([self._make_entry(row, rcpts.get(row[0], [])) for row in rows], total)

        return await self._db(read)

    async def list(self) -> list[QueueEntry]:
        """Every entry (tests, small queues); admin tools use ``query`` with a limit."""
        return (await self.query(QueueFilter(), limit=None)).entries

    async def retry_matching(self, where: QueueFilter, now: float) -> int:
        (self.directory / "flush").touch()  # also tells a running server to retry held-back upstreams
        return await self._db(lambda conn: make_due(conn, where, now))

    async def _change(self, sql: str, params: tuple[Any, ...], queue_id: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            if (
                conn.execute(sql, params).rowcount == 0
                and not conn.execute("SELECT 1 FROM messages WHERE queue_id=?", (queue_id,)).fetchone()
            ):
                raise QueueEntryNotFound(queue_id)

        await self._db(write)

    async def hold(self, queue_id: str, held: bool) -> None:
        await self._change("UPDATE messages SET held=? WHERE queue_id=?", (int(held), queue_id), queue_id)

    def flush_requested(self) -> float:
        """When an admin last asked to retry now (``relay365 queue retry``, from any process)."""
        try:
            return (self.directory / "flush").stat().st_mtime
        except FileNotFoundError:
            return 0.0

    async def retry(self, queue_id: str, now: float) -> None:
        (self.directory / "flush").touch()  # also tells a running server to retry held-back upstreams
        await self._change(
            "UPDATE recipients SET next_attempt=? WHERE queue_id=? AND state IN (?,?)",
            (now, queue_id, *_OPEN_STATES),
            queue_id,
        )

    async def delete(self, queue_id: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            if conn.execute("DELETE FROM messages WHERE queue_id=?", (queue_id,)).rowcount == 0:
                raise QueueEntryNotFound(queue_id)

        await self._db(write)
        (self.messages_dir / queue_id).unlink(missing_ok=True)


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back unless SQLite already did: on SQLITE_FULL (disk full) or SQLITE_IOERR it rolls the
    transaction back itself, and a second ROLLBACK would replace the real error with "cannot rollback"
    (turning a 452 4.3.1 into a 451 4.3.0)."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
