"""The follower's work in SQLite: a table of its own in the tracking log's database (``tracking.db``).

The rows are the follower's part of the tracking log: they live and are purged beside its events, and
relays that share the spool directory (and so the tracking log) share them too. Claims are taken in
``BEGIN IMMEDIATE`` transactions, so two processes on one file never hold a row at once
(https://www.sqlite.org/lang_transaction.html); the file is in WAL mode with ``synchronous=NORMAL``,
like the events (a power loss may forget the last settled rows, which are then asked about again).
One connection on one thread: the event loop never waits for the disk.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from relay365.tracing.work import FollowItem, OutcomeCount

T = TypeVar("T")

_FIELDS = (
    "queue_id", "recipient", "message_id", "sender", "subject", "device", "transport", "route",
    "sent_at", "due", "status", "trace_id", "received_at", "from_ip", "checks", "done", "details_due",
)  # fmt: skip
_SCHEMA = """
CREATE TABLE IF NOT EXISTS m365_follow (
    queue_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    message_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    subject TEXT NOT NULL,
    device TEXT NOT NULL,
    transport TEXT NOT NULL,
    route TEXT NOT NULL,
    sent_at REAL NOT NULL,
    due REAL NOT NULL,
    status TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    from_ip TEXT NOT NULL,
    checks INTEGER NOT NULL,
    done INTEGER NOT NULL,
    details_due INTEGER NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    lease_until REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (queue_id, recipient)
);
CREATE INDEX IF NOT EXISTS m365_follow_due ON m365_follow(done, due);
CREATE INDEX IF NOT EXISTS m365_follow_sent ON m365_follow(sent_at);
CREATE TABLE IF NOT EXISTS m365_follow_state (name TEXT PRIMARY KEY, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS m365_follow_leader (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, lease_until REAL NOT NULL
);
"""
_COLUMNS = ", ".join(_FIELDS)
_INSERT = f"INSERT OR IGNORE INTO m365_follow ({_COLUMNS}) VALUES ({', '.join('?' * len(_FIELDS))})"  # noqa: S608
_SETTLE = (
    "UPDATE m365_follow SET status = ?, trace_id = ?, received_at = ?, from_ip = ?, checks = ?, done = ?,"
    " details_due = ?, due = ?, owner = '', lease_until = 0"
    " WHERE queue_id = ? AND recipient = ? AND owner = ?"
)


def _row(item: FollowItem) -> tuple[Any, ...]:
    return tuple(int(v) if isinstance(v, bool) else v for v in (getattr(item, f) for f in _FIELDS))


def _item(row: Sequence[Any]) -> FollowItem:
    values = dict(zip(_FIELDS, row, strict=True))
    values["done"], values["details_due"] = bool(values["done"]), bool(values["details_due"])
    return FollowItem(**values)


class SqliteFollowStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="m365-follow")
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._conn is not None, "the follow store is not open"
            return fn(self._conn)

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def open(self) -> None:
        def connect() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Addresses and subjects are personal data: for the service user only (as the events).
            # Only when it is new: closing any descriptor of a file drops every POSIX lock this process
            # holds on it, the tracking log's SQLite locks included (fcntl(2), "F_SETLK").
            if not self.path.exists():
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=10000")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._conn = conn

        await asyncio.get_running_loop().run_in_executor(self._pool, connect)

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(lambda conn: conn.close())
            self._conn = None
        self._pool.shutdown(wait=True)

    @staticmethod
    def _write(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            out = fn(conn)
            conn.execute("COMMIT")
            return out
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def add(self, items: Sequence[FollowItem]) -> int:
        rows = [_row(i) for i in items]

        def insert(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.executemany(_INSERT, rows)
            return conn.total_changes - before

        return await self._run(lambda conn: self._write(conn, insert)) if rows else 0

    async def claim(self, *, owner: str, now: float, lease: float, limit: int) -> list[FollowItem]:
        def take(conn: sqlite3.Connection) -> list[FollowItem]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM m365_follow WHERE done = 0 AND due <= ?"  # noqa: S608
                " AND (owner = '' OR owner = ? OR lease_until < ?) ORDER BY due, queue_id, recipient LIMIT ?",
                (now, owner, now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE m365_follow SET owner = ?, lease_until = ? WHERE queue_id = ? AND recipient = ?",
                [(owner, now + lease, r[0], r[1]) for r in rows],
            )
            return [_item(r) for r in rows]

        return await self._run(lambda conn: self._write(conn, take))

    async def settle(self, items: Sequence[FollowItem], *, owner: str) -> list[FollowItem]:
        def write(conn: sqlite3.Connection) -> list[FollowItem]:
            written = []
            for i in items:
                values = (i.status, i.trace_id, i.received_at, i.from_ip, i.checks, int(i.done),
                          int(i.details_due), i.due, i.queue_id, i.recipient, owner)  # fmt: skip
                if conn.execute(_SETTLE, values).rowcount == 1:
                    written.append(i)
            return written

        return await self._run(lambda conn: self._write(conn, write)) if items else []

    async def release(self, *, owner: str) -> int:
        def free(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM m365_follow_leader WHERE owner = ?", (owner,))
            return conn.execute(
                "UPDATE m365_follow SET owner = '', lease_until = 0 WHERE owner = ?", (owner,)
            ).rowcount

        return await self._run(lambda conn: self._write(conn, free))

    async def lead(self, *, owner: str, now: float, lease: float) -> bool:
        def take(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute(
                    "INSERT INTO m365_follow_leader (name, owner, lease_until) VALUES ('asker', ?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
                    " lease_until = excluded.lease_until"
                    " WHERE m365_follow_leader.owner = excluded.owner OR m365_follow_leader.lease_until < ?",
                    (owner, now + lease, now),
                ).rowcount
                == 1
            )

        return await self._run(lambda conn: self._write(conn, take))

    async def cursor(self) -> float | None:
        def read(conn: sqlite3.Connection) -> float | None:
            row = conn.execute("SELECT value FROM m365_follow_state WHERE name = 'cursor'").fetchone()
            return float(row[0]) if row else None

        return await self._run(read)

    async def set_cursor(self, at: float) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO m365_follow_state (name, value) VALUES ('cursor', ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (at,),
            )

        await self._run(lambda conn: self._write(conn, write))

    async def for_message(self, queue_id: str) -> list[FollowItem]:
        def read(conn: sqlite3.Connection) -> list[FollowItem]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM m365_follow WHERE queue_id = ? ORDER BY recipient",  # noqa: S608
                (queue_id,),
            ).fetchall()
            return [_item(r) for r in rows]

        return await self._run(read)

    async def outcomes(self, since: float) -> list[OutcomeCount]:
        def read(conn: sqlite3.Connection) -> list[OutcomeCount]:
            rows = conn.execute(
                "SELECT route, transport, status, COUNT(*) FROM m365_follow WHERE sent_at >= ?"
                " GROUP BY route, transport, status ORDER BY route, transport, status",
                (since,),
            ).fetchall()
            return [OutcomeCount(str(a), str(b), str(c), int(n)) for a, b, c, n in rows]

        return await self._run(read)

    async def next_due(self) -> float | None:
        def read(conn: sqlite3.Connection) -> float | None:
            row = conn.execute("SELECT MIN(due) FROM m365_follow WHERE done = 0").fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._run(read)

    async def purge(self, before: float) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM m365_follow WHERE done = 1 AND sent_at < ?", (before,)).rowcount

        return await self._run(lambda conn: self._write(conn, delete))
