"""The tracking log in PostgreSQL (``tracking_events``, in the spool's database): when several relays
share a queue, the message trace and the audit log are shared too, so any node's console finds what
happened to a message whichever node received or delivered it.

Like the SQLite log (tracking_sqlite.py) it is an observation, not the queue: ``record`` only appends
to a list (never blocks, never raises, callable from any thread); one writer task inserts whatever
has accumulated in one statement per batch. Its connections commit without waiting for the WAL
flush (``synchronous_commit = off``: the last events may be lost on a database crash, the queue's
promises are not), and a database outage only delays the events (up to ``BACKLOG_LIMIT`` are kept,
the oldest dropped and counted beyond that).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import psycopg_pool

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
from relay365.observability.tracking_sqlite import (
    BACKLOG_LIMIT,
    COLUMNS,
    PURGE_INTERVAL,
    like_pattern,
    log_event,
)
from relay365.spool.pg_connect import PgTarget, make_pool

log = logging.getLogger(__name__)
events_log = logging.getLogger("relay365.tracking")
RETRY = 2.0  # seconds between tries while the database cannot take the events
_ARRAYS = ", ".join("%s::double precision[]" if c == "at" else "%s::text[]" for c in COLUMNS)
_INSERT = (
    f"INSERT INTO relay365.tracking_events ({', '.join(COLUMNS)})"  # noqa: S608
    f" SELECT * FROM unnest({_ARRAYS}) RETURNING id"
)


def where_sql(q: TraceQuery) -> tuple[str, list[Any]]:
    """The WHERE clause for a query, from fixed fragments; every value is a ``%s`` parameter."""
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (("sender", q.sender), ("recipient", q.recipient)):
        if value is None:
            continue
        if "*" in value or value.strip().startswith("@"):
            clauses.append(f"{column} ILIKE %s ESCAPE '\\'")
            params.append(like_pattern(value))
        else:  # exact: the lower() index answers it
            clauses.append(f"lower({column}) = lower(%s)")
            params.append(value.strip())
    if q.subject is not None:
        clauses.append("subject ILIKE %s ESCAPE '\\'")
        params.append("%" + like_pattern(q.subject.replace("*", "")) + "%")
    exact = (
        ("message_id", normalize_message_id(q.message_id) if q.message_id is not None else None),
        ("queue_id", q.queue_id.strip().upper() if q.queue_id is not None else None),
        ("device", q.device),
        ("transport", q.transport),
    )
    for column, value in exact:
        if value is not None:
            clauses.append(f"{column} = %s")
            params.append(value)
    if q.kinds:
        clauses.append("kind = ANY(%s)")
        params.append([k.value for k in q.kinds])
    for condition, bound in (("at >= %s", q.since), ("at <= %s", q.until), ("id < %s", q.before)):
        if bound is not None:
            clauses.append(condition)
            params.append(bound)
    return " AND ".join(clauses) or "true", params


def _event(row: Sequence[Any]) -> TrackingEvent:
    values = dict(zip(("id", *COLUMNS), row, strict=True))
    values["kind"] = EventKind(values["kind"])
    return TrackingEvent(**values)


async def _async_commit(conn: psycopg.AsyncConnection[Any]) -> None:
    """The tracking log's connections: commits that do not wait for the WAL flush."""
    await conn.set_autocommit(True)
    await conn.execute("SET synchronous_commit TO off")


class PgTrackingLog:
    def __init__(
        self,
        target: PgTarget,
        *,
        retention_days: float = DEFAULT_RETENTION_DAYS,
        clock: Callable[[], float] = time.time,
        log_events: bool = True,
    ) -> None:
        self.retention_days = retention_days
        self._target = target
        self._clock = clock
        self._log_events = log_events
        self._pool: psycopg_pool.AsyncConnectionPool | None = None
        self._pending = Backlog(BACKLOG_LIMIT)
        self._last_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: asyncio.Task[None] | None = None
        self._purger: asyncio.Task[None] | None = None

    async def open(self, *, purge_every: float | None = PURGE_INTERVAL) -> None:
        self._loop = asyncio.get_running_loop()
        self._pool = make_pool(self._target, name="relay365-tracking", configure=_async_commit)
        await self._pool.open(wait=False)
        if purge_every is not None:
            self._purger = asyncio.create_task(self._purge_loop(purge_every), name="tracking-purge")

    async def close(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            await asyncio.gather(self._purger, return_exceptions=True)
            self._purger = None
        try:
            async with asyncio.timeout(5.0):
                await self.flush()
        except TimeoutError:
            log.warning("tracking log: %d event(s) not written before closing", len(self._pending))
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # -- writing -----------------------------------------------------------------------------------
    def record(self, event: TrackingEvent) -> None:
        if not self._pending.add(event):
            return
        loop = self._loop
        try:
            if loop is None or loop.is_closed():
                raise RuntimeError("no loop")
            loop.call_soon_threadsafe(self._kick)
        except RuntimeError:  # not open, or closing: nothing will write it any more
            self._pending.unschedule()

    def _kick(self) -> None:
        if self._pool is not None and (self._writer is None or self._writer.done()):
            self._writer = asyncio.get_running_loop().create_task(
                self._write_pending(), name="tracking-write"
            )

    async def _write_pending(self) -> None:
        while (taken := self._pending.take()) is not None:
            batch, dropped = taken
            if dropped:
                log.warning("tracking log: dropped %d event(s) while the database was out of reach", dropped)
            try:
                await self._insert(batch)
            except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as e:
                log.error("tracking log: could not write %d event(s), retrying: %s", len(batch), e)
                self._pending.put_back(batch)
                await asyncio.sleep(RETRY)

    async def _insert(self, batch: list[TrackingEvent]) -> None:
        assert self._pool is not None
        clipped = [e.clipped() for e in batch]
        columns: list[list[Any]] = [[] for _ in COLUMNS]
        for e in clipped:
            values = e.as_dict()
            for i, c in enumerate(COLUMNS):
                columns[i].append(values[c].value if c == "kind" else values[c])
        async with self._pool.connection() as conn:
            cur = await conn.execute(_INSERT.encode(), columns)
            ids = [row[0] for row in await cur.fetchall()]
        self._last_id = max(self._last_id, *ids) if ids else self._last_id
        if self._log_events and events_log.isEnabledFor(logging.INFO):
            for e in batch:
                log_event(e)

    async def flush(self) -> None:
        """Wait until every event recorded so far is written."""
        if self._pending.wake():
            self._kick()
        writer = self._writer
        if writer is not None and not writer.done():
            await asyncio.shield(writer)

    def last_id(self) -> int:
        return self._last_id

    # -- reading -----------------------------------------------------------------------------------
    async def search(self, query: TraceQuery) -> TracePage:
        assert self._pool is not None, "tracking log is not open"
        limit = max(1, min(query.limit, MAX_PAGE))
        sql, params = where_sql(query)
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT id, {', '.join(COLUMNS)} FROM relay365.tracking_events WHERE {sql}"  # noqa: S608
                " ORDER BY id DESC LIMIT %s".encode(),
                [*params, limit + 1],
            )
            rows = await cur.fetchall()
        events = [_event(r) for r in rows[:limit]]
        if events:
            self._last_id = max(self._last_id, events[0].id)
        return TracePage(events, events[-1].id if len(rows) > limit else None)

    async def counts(self, since: float) -> dict[EventKind, int]:
        assert self._pool is not None, "tracking log is not open"
        out = dict.fromkeys(EventKind, 0)
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT kind, count(*) FROM relay365.tracking_events WHERE at >= %s GROUP BY kind", (since,)
            )
            for kind, n in await cur.fetchall():
                out[EventKind(kind)] = int(n)
        return out

    async def purge(self, before: float) -> int:
        assert self._pool is not None, "tracking log is not open"
        total = 0
        while True:
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    "DELETE FROM relay365.tracking_events WHERE id IN"
                    " (SELECT id FROM relay365.tracking_events WHERE at < %s LIMIT 10000)",
                    (before,),
                )
            total += cur.rowcount
            if cur.rowcount < 10000:
                return total

    async def _purge_loop(self, every: float) -> None:
        while True:
            try:
                removed = await self.purge(self._clock() - self.retention_days * 86_400)
                if removed:
                    log.info(
                        "tracking log: removed %d event(s) older than %g days", removed, self.retention_days
                    )
            except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
                log.error("tracking log: purge failed: %s", e)
            await asyncio.sleep(every)
