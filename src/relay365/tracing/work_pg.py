"""The follower's work in PostgreSQL: tables of their own in the spool's database (schema version 2 of
``spool/pg_schema.py``), beside the shared tracking log.

With a PostgreSQL spool several relay nodes deliver from one queue and write one tracking log, so every
node's follower takes in the same ``delivered`` events: the rows must be shared too, or each node
would ask Microsoft about every message and spend the tenant's quota (100 trace requests per 5
minutes, budget.py) several times over.

- ``add``: one ``INSERT ... ON CONFLICT DO NOTHING`` per batch (the same event taken in by two nodes
  makes one row);
- ``claim``: ``SELECT ... FOR UPDATE SKIP LOCKED`` in the ``UPDATE`` that sets owner and lease, so two
  nodes claiming at the same moment never wait for each other and never get the same row
  (https://www.postgresql.org/docs/current/sql-select.html#SQL-FOR-UPDATE-SHARE); a row another node
  committed a claim on is re-checked against the lease condition and left out;
- ``settle``: one ``UPDATE ... FROM unnest(...) WHERE owner = ...`` (only rows the owner still holds);
- ``lead``: ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` on the one ``asker`` row;
- the cursor only moves forward (``greatest``): two nodes' intakes may finish in either order.

Every statement commits at once (``synchronous_commit = on``, as the queue's); psycopg's errors come
out as ``SpoolIOError`` (the follower logs them and tries again next pass).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg_pool

from relay365.spool.pg_connect import PgTarget, make_pool, mapped
from relay365.tracing.work import FollowItem, OutcomeCount

T = TypeVar("T")
WHAT = "PostgreSQL follow store"
POOL_SIZE = 2  # one pass at a time, plus the console's reads

_TEXT = ("queue_id", "recipient", "message_id", "sender", "subject", "device", "transport", "route")
_FLOAT = ("sent_at", "due")
_STATE_TEXT = ("status", "trace_id")
_STATE_FLOAT = ("received_at",)
_FIELDS = (*_TEXT, *_FLOAT, *_STATE_TEXT, *_STATE_FLOAT, "from_ip", "checks", "done", "details_due")
_COLUMNS = ", ".join(_FIELDS)
_TYPES = {
    **dict.fromkeys((*_TEXT, *_STATE_TEXT, "from_ip"), "text[]"),
    **dict.fromkeys((*_FLOAT, *_STATE_FLOAT), "double precision[]"),
    "checks": "integer[]",
    "done": "boolean[]",
    "details_due": "boolean[]",
}
_INSERT = (
    f"INSERT INTO relay365.m365_follow ({_COLUMNS})"  # noqa: S608
    f" SELECT * FROM unnest({', '.join(f'%s::{_TYPES[f]}' for f in _FIELDS)})"
    " ON CONFLICT (queue_id, recipient) DO NOTHING"
)
_CLAIM = (
    "WITH due AS ("  # noqa: S608 (column names only)
    " SELECT queue_id, recipient FROM relay365.m365_follow"
    " WHERE NOT done AND due <= %(now)s AND (owner = '' OR owner = %(owner)s OR lease_until < %(now)s)"
    " ORDER BY due, queue_id, recipient LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
    " UPDATE relay365.m365_follow f SET owner = %(owner)s, lease_until = %(until)s FROM due"
    " WHERE f.queue_id = due.queue_id AND f.recipient = due.recipient"
    f" RETURNING {', '.join('f.' + c for c in _FIELDS)}"
)
_SETTLED = ("queue_id", "recipient", "status", "trace_id", "received_at", "from_ip", "checks", "done",
            "details_due", "due")  # fmt: skip
_SETTLE = (
    "UPDATE relay365.m365_follow f SET status = s.status, trace_id = s.trace_id,"  # noqa: S608
    " received_at = s.received_at, from_ip = s.from_ip, checks = s.checks, done = s.done,"
    " details_due = s.details_due, due = s.due, owner = '', lease_until = 0"
    f" FROM unnest({', '.join(f'%s::{_TYPES[f]}' for f in _SETTLED)}) AS s ({', '.join(_SETTLED)})"
    " WHERE f.queue_id = s.queue_id AND f.recipient = s.recipient AND f.owner = %s"
    " RETURNING f.queue_id, f.recipient"
)


def _columns(items: Sequence[FollowItem], fields: Sequence[str]) -> list[list[Any]]:
    """The items as one array per column (``unnest`` makes them rows again)."""
    return [[getattr(i, f) for i in items] for f in fields]


def _item(row: Sequence[Any]) -> FollowItem:
    return FollowItem(**dict(zip(_FIELDS, row, strict=True)))


class PgFollowStore:
    """The follow store (work.py's contract) in the PostgreSQL spool's database; its own small pool."""

    def __init__(self, target: PgTarget) -> None:
        self._target = dataclasses.replace(target, pool_size=min(POOL_SIZE, target.pool_size))
        self._pool: psycopg_pool.AsyncConnectionPool | None = None

    async def open(self) -> None:
        self._pool = make_pool(self._target, name="relay365-follow")
        await self._pool.open(wait=False)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _run(self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """``fn`` in one transaction; psycopg's errors as ``SpoolIOError``."""
        assert self._pool is not None, "the follow store is not open"
        with mapped(WHAT):
            async with self._pool.connection() as conn, conn.transaction():
                return await fn(conn)

    async def add(self, items: Sequence[FollowItem]) -> int:
        if not items:
            return 0

        async def insert(conn: psycopg.AsyncConnection[Any]) -> int:
            cur = await conn.execute(_INSERT.encode(), _columns(items, _FIELDS))
            return max(cur.rowcount, 0)

        return await self._run(insert)

    async def claim(self, *, owner: str, now: float, lease: float, limit: int) -> list[FollowItem]:
        async def take(conn: psycopg.AsyncConnection[Any]) -> list[FollowItem]:
            cur = await conn.execute(
                _CLAIM.encode(), {"now": now, "owner": owner, "until": now + lease, "limit": limit}
            )
            return [_item(r) for r in await cur.fetchall()]

        rows = await self._run(take)
        return sorted(rows, key=lambda r: (r.due, r.key))  # RETURNING keeps no order

    async def settle(self, items: Sequence[FollowItem], *, owner: str) -> list[FollowItem]:
        if not items:
            return []

        async def write(conn: psycopg.AsyncConnection[Any]) -> set[tuple[str, str]]:
            cur = await conn.execute(_SETTLE.encode(), [*_columns(items, _SETTLED), owner])
            return {(str(q), str(r)) for q, r in await cur.fetchall()}

        written = await self._run(write)
        return [i for i in items if i.key in written]

    async def release(self, *, owner: str) -> int:
        async def free(conn: psycopg.AsyncConnection[Any]) -> int:
            await conn.execute("DELETE FROM relay365.m365_follow_leader WHERE owner = %s", (owner,))
            cur = await conn.execute(
                "UPDATE relay365.m365_follow SET owner = '', lease_until = 0 WHERE owner = %s", (owner,)
            )
            return cur.rowcount

        return await self._run(free)

    async def lead(self, *, owner: str, now: float, lease: float) -> bool:
        async def take(conn: psycopg.AsyncConnection[Any]) -> bool:
            cur = await conn.execute(
                "INSERT INTO relay365.m365_follow_leader AS l (name, owner, lease_until)"
                " VALUES ('asker', %s, %s) ON CONFLICT (name) DO UPDATE"
                " SET owner = excluded.owner, lease_until = excluded.lease_until"
                " WHERE l.owner = excluded.owner OR l.lease_until < %s",
                (owner, now + lease, now),
            )
            return cur.rowcount == 1

        return await self._run(take)

    async def cursor(self) -> float | None:
        async def read(conn: psycopg.AsyncConnection[Any]) -> float | None:
            cur = await conn.execute("SELECT value FROM relay365.m365_follow_state WHERE name = 'cursor'")
            row = await cur.fetchone()
            return float(row[0]) if row else None

        return await self._run(read)

    async def set_cursor(self, at: float) -> None:
        async def write(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                "INSERT INTO relay365.m365_follow_state AS s (name, value) VALUES ('cursor', %s)"
                " ON CONFLICT (name) DO UPDATE SET value = greatest(s.value, excluded.value)",
                (at,),
            )

        await self._run(write)

    async def for_message(self, queue_id: str) -> list[FollowItem]:
        async def read(conn: psycopg.AsyncConnection[Any]) -> list[FollowItem]:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM relay365.m365_follow WHERE queue_id = %s",  # noqa: S608
                (queue_id,),
            )
            return [_item(r) for r in await cur.fetchall()]

        return sorted(await self._run(read), key=lambda r: r.recipient)

    async def outcomes(self, since: float) -> list[OutcomeCount]:
        async def read(conn: psycopg.AsyncConnection[Any]) -> list[OutcomeCount]:
            cur = await conn.execute(
                "SELECT route, transport, status, count(*) FROM relay365.m365_follow WHERE sent_at >= %s"
                " GROUP BY route, transport, status",
                (since,),
            )
            return [OutcomeCount(str(a), str(b), str(c), int(n)) for a, b, c, n in await cur.fetchall()]

        return sorted(await self._run(read), key=lambda c: (c.route, c.transport, c.status))

    async def next_due(self) -> float | None:
        async def read(conn: psycopg.AsyncConnection[Any]) -> float | None:
            cur = await conn.execute("SELECT min(due) FROM relay365.m365_follow WHERE NOT done")
            row = await cur.fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._run(read)

    async def purge(self, before: float) -> int:
        async def delete(conn: psycopg.AsyncConnection[Any]) -> int:
            cur = await conn.execute(
                "DELETE FROM relay365.m365_follow WHERE done AND sent_at < %s", (before,)
            )
            return cur.rowcount

        return await self._run(delete)
