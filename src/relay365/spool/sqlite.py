"""The embedded spool: message bodies as files, envelopes, recipient states and claims in SQLite (WAL).

Durability (RFC 5321 section 6.1: once 250 is sent, the relay owns the message):
1. ingress streams DATA into ``messages/<owner>/<queue id>`` (mode 0600) and the file is fsynced;
2. a group commit fsyncs the owner's directory once, then inserts the rows of every message waiting
   in the batch in one SQLite transaction (``synchronous=FULL``: the WAL is fsynced);
3. only then does ingress answer ``250 2.0.0 Ok: queued as <id>``.
The row is the commit point: a body file without a row is a crash leftover, removed by ``recover``
once its owner is provably dead (sqlite_owners.py); a queue entry is therefore complete or absent,
and no process ever removes another live process's files.

Several processes share the spool (the server, ``relay365 queue``, worker processes): SQLite's
write lock serialises their transactions, claims (``lease_owner``, ``lease_until``) keep their
deliveries apart, and each notices the others' commits through ``PRAGMA data_version``, polled
every ``FOREIGN_POLL`` seconds while it waits in ``wait_changed``.

Free-space reserve (Postfix's ``queue_minfree``): incoming messages may not bring the file system's
free space below ``min_free`` bytes (``SpoolFullError``, ingress answers ``452 4.3.1``), so the
queue's own bookkeeping (delivery outcomes, DSNs, which do not check the reserve) can still be
written when devices have filled the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from relay365.errors import SpoolError, SpoolFullError
from relay365.spool import sqlite_rows as rows_sql
from relay365.spool import sqlite_schema as schema
from relay365.spool.contract import Recovery
from relay365.spool.filters import make_due, select_page
from relay365.spool.model import (
    BodyReader,
    Bounce,
    Envelope,
    PaceEvent,
    QueueEntry,
    QueueFilter,
    QueueOrder,
    QueuePage,
    QueueStats,
    RecipientUpdate,
    new_owner_id,
)
from relay365.spool.sqlite_files import (
    SqliteBodyReader,
    SqliteIncoming,
    fsync_dir,
    open_body,
    spool_error,
)
from relay365.spool.sqlite_owners import OwnerLock, check_owner, recover_dead
from relay365.spool.wire import stuff

log = logging.getLogger(__name__)
T = TypeVar("T")
Rows = list[tuple[str, Envelope, int]]  # queue id, envelope, size: messages to insert


class SqliteSpool:
    """The default spool. All SQLite work runs on one dedicated thread, serialised."""

    FOREIGN_POLL = 0.1  # seconds between PRAGMA data_version checks while waiting (~0.1 ms each)

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.time, min_free: int = 0) -> None:
        self.directory = directory
        self.min_free = min_free
        self.messages_dir = directory / "messages"
        self.owners_dir = directory / "owners"
        self.db_path = directory / "queue.db"
        self._clock = clock
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="spool-db")
        self._delegate: Callable[[Rows, float, str], None] | None = None
        self._io = ThreadPoolExecutor(8, thread_name_prefix="spool-io")
        self._conn: sqlite3.Connection | None = None
        self._pending: list[tuple[str, Envelope, int, asyncio.Future[None]]] = []
        self._pending_lock = threading.Lock()
        self._flushing = False
        self._owner: OwnerLock | None = None
        self._changed: asyncio.Event | None = None
        self._data_version = 0
        self._flush_generation = 0

    # -- plumbing ------------------------------------------------------------------------------------
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

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def open(self) -> None:
        self._changed = asyncio.Event()
        # Envelopes sit in queue.db and its -wal/-shm files: the spool is for the service user only.
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.messages_dir.mkdir(exist_ok=True, mode=0o700)

        def connect() -> None:
            self._conn = schema.connect(self.db_path)
            self._data_version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            self._flush_generation = schema.flush_generation(self._conn)

        try:
            await asyncio.get_running_loop().run_in_executor(self._db_thread, connect)
        except (OSError, sqlite3.Error) as e:
            raise spool_error(e) from e

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._db_thread, shut)
        self._db_thread.shutdown(wait=True)
        self._io.shutdown(wait=True)
        if self._owner is not None:
            self._owner.release()

    # -- owners --------------------------------------------------------------------------------------
    @property
    def owner(self) -> str | None:
        return self._owner.owner if self._owner is not None else None

    def _attach(self, owner: str | None = None) -> str:
        """Become ``owner`` (a new one if None) unless already attached: lock, then body directory."""
        if self._owner is not None:
            if owner is not None and owner != self._owner.owner:
                raise ValueError(f"this spool handle works as {self._owner.owner}, not {owner}")
            return self._owner.owner
        lock = OwnerLock(self.owners_dir, check_owner(owner or new_owner_id()))
        try:
            lock.acquire()
            self._owner = lock
            self.make_owner_dir()
        except OSError as e:
            raise spool_error(e) from e
        return lock.owner

    def owner_dir_name(self) -> str:
        return self._attach()

    def make_owner_dir(self) -> None:
        """messages/<owner>, made durable in messages/ before any body is committed into it."""
        directory = self.messages_dir / self.owner_dir_name()
        if not directory.is_dir():
            directory.mkdir(mode=0o700, exist_ok=True)
            fsync_dir(self.messages_dir)

    async def recover(self, owner: str) -> Recovery:
        me = self._attach(owner)
        found = await self._db(
            lambda conn: recover_dead(conn, owners_dir=self.owners_dir, messages_dir=self.messages_dir, me=me)
        )
        if found.bodies_removed or found.claims_released:
            log.warning(
                "spool recovery: removed %d incomplete message file(s), released %d claim(s) of %d"
                " dead owner(s)",
                found.bodies_removed,
                found.claims_released,
                len(found.dead_owners),
            )
        if found.claims_released:
            self._notify()
        return found

    # -- receiving -----------------------------------------------------------------------------------
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
        msg.write(stuff(body))
        return await msg.commit(envelope)

    def delegate_commits(self, commit: Callable[[Rows, float, str], None]) -> None:
        """An ingress worker's spool (service/worker.py): after the group commit's directory fsync, the
        rows go to ``commit(rows, now, body_dir)`` (called from the spool's database thread; it returns
        once they are committed, or raises ``SpoolError``), which has the supervisor write them with
        ``insert_delegated``: queue.db keeps one writing process and no process waits on another's lock
        (SQLite's busy handler sleeps in steps of milliseconds)."""
        self._delegate = commit

    async def insert_delegated(self, rows: Rows, now: float, body_dir: str) -> None:
        """Commit the rows of messages another process (an ingress worker) spooled and fsynced under
        ``messages/<body_dir>/``; returns once they are durable."""

        def write(conn: sqlite3.Connection) -> None:
            self._write_rows(conn, rows, now, body_dir)

        await self._db(write)
        self._notify()

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
        self._notify()

    def _flush(self) -> None:
        while True:
            with self._pending_lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._flushing = False
                    return
            error: BaseException | None = None
            try:
                body_dir = self.owner_dir_name()
                fsync_dir(self.messages_dir / body_dir)
                assert self._conn is not None
                now = self._clock()
                rows = [(q, e, s) for q, e, s, _ in batch]
                if self._delegate is not None:
                    self._delegate(rows, now, body_dir)
                else:
                    self._write_rows(self._conn, rows, now, body_dir)
            except (OSError, sqlite3.Error, SpoolError) as e:  # (SpoolError: the delegate's)
                error = spool_error(e)
            for *_, fut in batch:
                fut.get_loop().call_soon_threadsafe(_settle, fut, error)

    @staticmethod
    def _write_rows(
        conn: sqlite3.Connection, rows: Sequence[tuple[str, Envelope, int]], now: float, body_dir: str
    ) -> None:
        with rows_sql.transaction(conn):
            rows_sql.insert_rows(conn, rows, now, body_dir)

    _insert_rows = staticmethod(rows_sql.insert_rows)  # (tests fill a big queue with it)

    # -- entries -------------------------------------------------------------------------------------
    def _path(self, queue_id: str, body_dir: str) -> Path:
        return self.messages_dir / body_dir / queue_id if body_dir else self.messages_dir / queue_id

    def body_file(self, entry: QueueEntry) -> Path:
        """Where this spool keeps the body of ``entry`` (tests and diagnostics of this backend only:
        everyone else reads bodies with ``body``)."""
        return self._path(entry.queue_id, entry.body_ref)

    @contextlib.asynccontextmanager
    async def _open_body(self, entry: QueueEntry) -> AsyncIterator[BodyReader]:
        path = self._path(entry.queue_id, entry.body_ref)
        fd, size = await self.run_io(lambda: open_body(path, entry.queue_id))
        try:
            yield SqliteBodyReader(fd, size, entry.queue_id, self.run_io)
        finally:
            os.close(fd)

    def body(self, entry: QueueEntry) -> contextlib.AbstractAsyncContextManager[BodyReader]:
        return self._open_body(entry)

    # -- delivery ------------------------------------------------------------------------------------
    async def claim(self, *, owner: str, now: float, limit: int, lease: float) -> list[QueueEntry]:
        self._attach(owner)
        return await self._db(
            lambda conn: rows_sql.claim(conn, owner=owner, now=now, limit=limit, lease=lease)
        )

    async def renew(self, queue_ids: Sequence[str], *, owner: str, until: float) -> set[str]:
        ids = list(queue_ids)
        return (
            await self._db(lambda conn: rows_sql.renew(conn, ids, owner=owner, until=until)) if ids else set()
        )

    async def release(self, queue_id: str, *, owner: str) -> None:
        if await self._db(lambda conn: rows_sql.release(conn, queue_id, owner=owner)):
            self._notify()

    async def next_due_time(self) -> float | None:
        return await self._db(rows_sql.next_due_time)

    async def record(
        self,
        queue_id: str,
        updates: Sequence[RecipientUpdate],
        *,
        owner: str,
        bounce: Bounce | None = None,
        pace_events: Sequence[PaceEvent] = (),
    ) -> None:
        dsn: SqliteIncoming | None = None
        if bounce is not None:
            dsn = SqliteIncoming(self, keep_reserve=False)  # bookkeeping: may use the reserve
            dsn.write(bounce.body)
            await self.run_io(dsn.sync)

        def write(conn: sqlite3.Connection) -> str | None:
            new = None
            if dsn is not None and bounce is not None:
                fsync_dir(dsn.path.parent)
                new = (dsn.queue_id, bounce.envelope, dsn.size, dsn.body_dir)
            return rows_sql.apply_outcome(
                conn, queue_id, updates, owner=owner, dsn=new, pace_events=pace_events, now=self._clock()
            )

        try:
            finished_dir = await self._db(write)
        except BaseException:
            if dsn is not None:
                await dsn.abort()
            raise
        if finished_dir is not None:
            self._path(queue_id, finished_dir).unlink(missing_ok=True)
        if dsn is not None:
            self._notify()

    async def pace_events(self, since: float) -> list[PaceEvent]:
        return await self._db(lambda conn: rows_sql.pace_events(conn, since))

    # -- wake-ups ------------------------------------------------------------------------------------
    async def wait_changed(self, max_wait: float) -> bool:
        assert self._changed is not None, "spool is not open"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait
        while True:
            if self._changed.is_set():
                self._changed.clear()
                return True
            if await self._db(self._foreign_change):
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):  # (asyncio.timeout, unlike 3.11's wait_for,
                async with asyncio.timeout(min(remaining, self.FOREIGN_POLL)):  # keeps cancellations)
                    await self._changed.wait()

    def _foreign_change(self, conn: sqlite3.Connection) -> bool:
        """On the database thread: has another connection committed since we last looked?"""
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version:
            return False
        self._data_version = version
        self._flush_generation = max(self._flush_generation, schema.flush_generation(conn))
        return True

    def flush_generation(self) -> int:
        return self._flush_generation

    async def request_flush(self) -> None:
        await self._bump(lambda conn: None)

    async def _bump(self, change: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``change`` and one more flush request in one transaction; wake the waiters."""

        def write(conn: sqlite3.Connection) -> tuple[T, int]:
            with rows_sql.transaction(conn):
                return change(conn), schema.bump_flush(conn)

        result, generation = await self._db(write)
        self._flush_generation = max(self._flush_generation, generation)
        self._notify()
        return result

    # -- administration ------------------------------------------------------------------------------
    async def get(self, queue_id: str) -> QueueEntry:
        return await self._db(lambda conn: rows_sql.read_entry(conn, queue_id))

    async def stats(self) -> QueueStats:
        return await self._db(rows_sql.stats)

    async def query(
        self,
        where: QueueFilter,
        *,
        limit: int | None,
        order: QueueOrder = "oldest",
        cursor: str | None = None,
    ) -> QueuePage:
        """Filtered, counted and keyset-paged in SQL (filters.py): a count and two queries for the
        page, whatever the size of the queue."""
        now = self._clock()

        def read(conn: sqlite3.Connection) -> QueuePage:
            total, rows, rcpts, more = select_page(
                conn, where, limit=limit, order=order, cursor=cursor, now=now
            )
            entries = [rows_sql.make_entry(row, rcpts.get(row[0], [])) for row in rows]
            return QueuePage(entries, total, entries[-1].queue_id if more and entries else None)

        return await self._db(read)

    async def list(self) -> list[QueueEntry]:
        return (await self.query(QueueFilter(), limit=None)).entries

    async def retry_matching(self, where: QueueFilter, now: float) -> int:
        # Also a flush: a running server retries the upstreams it holds back.
        return await self._bump(lambda conn: make_due(conn, where, now))

    async def retry(self, queue_id: str, now: float) -> None:
        await self._bump(lambda conn: rows_sql.make_one_due(conn, queue_id, now))

    async def hold(self, queue_id: str, held: bool) -> None:
        await self._db(lambda conn: rows_sql.set_held(conn, queue_id, held))
        if not held:
            self._notify()

    async def delete(self, queue_id: str) -> None:
        body_dir = await self._db(lambda conn: rows_sql.delete(conn, queue_id))
        self._path(queue_id, body_dir).unlink(missing_ok=True)


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
