"""The tracking log in SQLite: its own database file (``tracking.db``) beside the queue's.

Why a separate file: the queue's database is written with ``synchronous=FULL`` (a 250 is a promise);
the tracking log uses WAL with ``synchronous=NORMAL``, which may lose the last transactions on power
loss but never corrupts the file (https://www.sqlite.org/pragma.html#pragma_synchronous), and its
writes never queue behind or in front of the spool's commits.

Writing: ``record`` appends to a list under a lock (no I/O, no system call on the event loop); one
writer thread inserts whatever has accumulated in one transaction, so a burst of events costs one
commit. Searching uses a second connection on its own thread: WAL readers do not wait for the writer.
The SQL is plain (one table, ``LIKE``, ``ORDER BY id``) so a PostgreSQL backend can say the same.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from relay365.observability.tracking import (
    DEFAULT_RETENTION_DAYS,
    MAX_PAGE,
    Backlog,
    EventKind,
    TracePage,
    TraceQuery,
    TrackingEvent,
    normalize_message_id,
)
from relay365.observability.tracking_schema import SCHEMA
from relay365.spool.schema_version import check_version, migrate

log = logging.getLogger(__name__)
events_log = logging.getLogger("relay365.tracking")
T = TypeVar("T")

_COLUMNS = (
    "at",
    "kind",
    "queue_id",
    "message_id",
    "subject",
    "sender",
    "recipient",
    "device",
    "peer",
    "listener",
    "transport",
    "reply",
    "actor",
    "detail",
)
_INSERT = f"INSERT INTO events ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"  # noqa: S608
BACKLOG_LIMIT = 200_000  # events waiting for a stuck disk before the oldest are dropped (and counted)
PURGE_CHUNK = 10_000  # rows per purge transaction, so the writer is never held long
PURGE_INTERVAL = 3600.0
# The tracking log shares the spool's file system: it stops writing (and counts what it drops) while
# less than this is free, so it never takes the room the queue needs for mail and its bookkeeping.
MIN_FREE = 128 * 1024 * 1024


def _like(pattern: str) -> str:
    p = pattern.strip()
    if p.startswith("@"):
        p = "*" + p
    p = p.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return p.replace("*", "%")


def where_sql(q: TraceQuery) -> tuple[str, list[Any]]:
    """The WHERE clause for a query, from fixed fragments; every value is a ``?`` parameter."""
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (("sender", q.sender), ("recipient", q.recipient)):
        if value is None:
            continue
        if "*" in value or value.strip().startswith("@"):
            clauses.append(f"{column} LIKE ? ESCAPE '\\'")
            params.append(_like(value))
        else:  # exact: the NOCASE index answers it
            clauses.append(f"{column} = ? COLLATE NOCASE")
            params.append(value.strip())
    if q.subject is not None:
        clauses.append("subject LIKE ? ESCAPE '\\'")
        params.append("%" + _like(q.subject.replace("*", "")) + "%")
    if q.message_id is not None:
        clauses.append("message_id = ?")
        params.append(normalize_message_id(q.message_id))
    if q.queue_id is not None:
        clauses.append("queue_id = ?")
        params.append(q.queue_id.strip().upper())
    if q.device is not None:
        clauses.append("device = ?")
        params.append(q.device)
    if q.transport is not None:
        clauses.append("transport = ?")
        params.append(q.transport)
    if q.kinds:
        clauses.append(f"kind IN ({', '.join('?' * len(q.kinds))})")
        params.extend(k.value for k in q.kinds)
    bounds: tuple[tuple[str, float | None], ...] = (
        ("at >= ?", q.since),
        ("at <= ?", q.until),
        ("id < ?", q.before),
    )
    for condition, bound in bounds:
        if bound is not None:
            clauses.append(condition)
            params.append(bound)
    return " AND ".join(clauses) or "1", params


def _event(row: Sequence[Any]) -> TrackingEvent:
    values = dict(zip(("id", *_COLUMNS), row, strict=True))
    values["kind"] = EventKind(values["kind"])
    return TrackingEvent(**values)


class SqliteTrackingLog:
    def __init__(
        self,
        path: Path,
        *,
        retention_days: float = DEFAULT_RETENTION_DAYS,
        clock: Callable[[], float] = time.time,
        log_events: bool = True,
        min_free: int = MIN_FREE,
    ) -> None:
        self.path = path
        self.min_free = min_free
        self.retention_days = retention_days
        self._clock = clock
        self._log_events = log_events
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tracking-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="tracking-read")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._pending = Backlog(BACKLOG_LIMIT)
        self._last_id = 0
        self._full = False
        self._purger: asyncio.Task[None] | None = None

    def configure(self, *, retention_days: float, log_events: bool) -> None:
        """A reload: the retention (next purge) and the event log lines (next batch)."""
        self.retention_days = retention_days
        self._log_events = log_events

    # -- lifecycle -------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    def _open_writer(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.exists():
            check_version(SCHEMA, self.path)  # before journal_mode: nothing is written to a newer one
        # Addresses and subjects are personal data: the file is for the service user only.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            migrate(conn, SCHEMA, self.path)  # a tracking log of a newer relay365: SchemaVersionError
            self._last_id = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])
        except BaseException:
            conn.close()
            raise
        self._wconn = conn

    def _open_reader(self) -> None:
        self._rconn = self._connect()

    async def open(self, *, purge_every: float | None = PURGE_INTERVAL) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._open_writer)
        await loop.run_in_executor(self._reader, self._open_reader)
        if purge_every is not None:
            self._purger = asyncio.create_task(self._purge_loop(purge_every), name="tracking-purge")

    async def close(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            await asyncio.gather(self._purger, return_exceptions=True)
            self._purger = None
        loop = asyncio.get_running_loop()
        if self._wconn is not None:
            await self.flush()
            await loop.run_in_executor(self._writer, self._close_conn, self._wconn)
            self._wconn = None
        if self._rconn is not None:
            await loop.run_in_executor(self._reader, self._close_conn, self._rconn)
            self._rconn = None
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    @staticmethod
    def _close_conn(conn: sqlite3.Connection) -> None:
        conn.close()

    async def __aenter__(self) -> SqliteTrackingLog:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- writing -----------------------------------------------------------------------------------
    def record(self, event: TrackingEvent) -> None:
        if not self._pending.add(event):
            return
        try:
            self._writer.submit(self._write_pending)
        except RuntimeError:  # closed: nothing will write it any more
            self._pending.unschedule()

    def _write_pending(self) -> None:
        while (taken := self._pending.take()) is not None:
            batch, dropped = taken
            if dropped:
                log.warning("tracking log: dropped %d event(s) while the disk was too slow", dropped)
            if not self._room():
                continue
            try:
                self._insert(batch)
            except (OSError, sqlite3.Error) as e:  # an observation: mail goes on without it
                log.error("tracking log: could not write %d event(s): %s", len(batch), e)

    def _room(self) -> bool:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return True  # let the insert report the real problem
        if st.f_bavail * st.f_frsize >= self.min_free:
            self._full = False
            return True
        if not self._full:
            log.error(
                "tracking log: less than %d MiB free on %s; not recording events until there is",
                self.min_free >> 20,
                self.path.parent,
            )
        self._full = True
        return False

    def _insert(self, batch: list[TrackingEvent]) -> None:
        conn = self._wconn
        if conn is None:
            return
        rows = []
        for e in batch:
            c = e.clipped()
            rows.append(
                (
                    c.at,
                    c.kind.value,
                    c.queue_id,
                    c.message_id,
                    c.subject,
                    c.sender,
                    c.recipient,
                    c.device,
                    c.peer,
                    c.listener,
                    c.transport,
                    c.reply,
                    c.actor,
                    c.detail,
                )
            )
        conn.execute("BEGIN")
        try:
            conn.executemany(_INSERT, rows)
            last = int(conn.execute("SELECT MAX(id) FROM events").fetchone()[0] or 0)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._last_id = last
        if self._log_events and events_log.isEnabledFor(logging.INFO):
            for e in batch:
                _log_event(e)

    async def flush(self) -> None:
        # The writer runs tasks in order: once this no-op has run, everything before it is written.
        await asyncio.get_running_loop().run_in_executor(self._writer, lambda: None)

    def last_id(self) -> int:
        return self._last_id

    # -- reading ---------------------------------------------------------------------------------
    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._rconn is not None, "tracking log is not open"
            return fn(self._rconn)

        return await asyncio.get_running_loop().run_in_executor(self._reader, call)

    async def search(self, query: TraceQuery) -> TracePage:
        limit = max(1, min(query.limit, MAX_PAGE))
        sql, params = where_sql(query)

        def read(conn: sqlite3.Connection) -> TracePage:
            rows = conn.execute(
                f"SELECT id, {', '.join(_COLUMNS)} FROM events WHERE {sql} ORDER BY id DESC LIMIT ?",  # noqa: S608
                [*params, limit + 1],
            ).fetchall()
            events = [_event(r) for r in rows[:limit]]
            return TracePage(events, events[-1].id if len(rows) > limit else None)

        return await self._read(read)

    async def counts(self, since: float) -> dict[EventKind, int]:
        def read(conn: sqlite3.Connection) -> dict[EventKind, int]:
            out = dict.fromkeys(EventKind, 0)
            for kind, n in conn.execute(
                "SELECT kind, COUNT(*) FROM events WHERE at >= ? GROUP BY kind", (since,)
            ):
                out[EventKind(kind)] = int(n)
            return out

        return await self._read(read)

    async def purge(self, before: float) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            total = 0
            while True:
                n = conn.execute(
                    "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < ? LIMIT ?)",
                    (before, PURGE_CHUNK),
                ).rowcount
                total += n
                if n < PURGE_CHUNK:
                    return total

        def run() -> int:
            assert self._wconn is not None
            return delete(self._wconn)

        return await asyncio.get_running_loop().run_in_executor(self._writer, run)

    async def _purge_loop(self, every: float) -> None:
        while True:
            try:
                removed = await self.purge(self._clock() - self.retention_days * 86_400)
                if removed:
                    log.info(
                        "tracking log: removed %d event(s) older than %g days", removed, self.retention_days
                    )
            except (OSError, sqlite3.Error) as e:
                log.error("tracking log: purge failed: %s", e)
            await asyncio.sleep(every)


COLUMNS = _COLUMNS  # (the PostgreSQL log, tracking_pg.py, stores the same columns)


def _log_event(e: TrackingEvent) -> None:
    """One structured line per event: the JSON log format shows the ``extra`` fields, the text
    format the Postfix-style pairs."""
    parts = [f"track {e.kind.value}"]
    if e.queue_id:
        parts.append(e.queue_id)
    for key, value in (
        ("from", f"<{e.sender}>" if e.sender or e.kind is EventKind.RECEIVED else ""),
        ("to", f"<{e.recipient}>" if e.recipient else ""),
        ("device", e.device),
        ("peer", e.peer),
        ("listener", e.listener),
        ("via", e.transport),
        ("user", e.actor),
        ("message_id", f"<{e.message_id}>" if e.message_id else ""),
        ("reply", repr(e.reply) if e.reply else ""),
    ):
        if value:
            parts.append(f"{key}={value}")
    events_log.info(" ".join(parts), extra={"tracking": e.as_dict()})


log_event = _log_event
like_pattern = _like
