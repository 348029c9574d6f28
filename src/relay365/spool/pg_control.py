"""A PostgreSQL spool handle's own two connections, outside the pool: wake-ups and the owner's life.

- **Wake-ups** (LISTEN/NOTIFY): every change other processes must hear of (new mail, a released
  claim or hold, a retry, a flush) sends ``pg_notify('relay365_spool', 'kind:token:generation')`` in
  the transaction that makes it, so it is delivered exactly when it commits, to every node at once.
  The listener ignores its own handle's notifications (``token``): those woke it directly. After a
  broken connection it reconnects by itself and reports a change (notifications may have been missed
  in between), so no node has to poll hard.
- **Liveness** (``recover``): an owner holds a session-level advisory lock, keyed by its row in
  ``owners``, for as long as its handle is open. PostgreSQL drops the lock when the session ends,
  however the process died (``kill -9``, a crash, or a vanished host once TCP keepalives give up,
  about 25 s), so a free lock proves the owner dead and a held one proves it alive. The lock
  connection is checked every ``CHECK_EVERY`` seconds and taken again after an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

import psycopg

from relay365.spool.pg_connect import SESSION_SETUP, PgTarget
from relay365.spool.pg_rows import CHANNEL

log = logging.getLogger(__name__)
LOCK_CLASS = 0x52333635  # pg_advisory_lock(classid, objid): "R365", the owner's lock_id
CHECK_EVERY = 5.0
RETRY_MAX = 5.0


async def connect(target: PgTarget) -> psycopg.AsyncConnection[Any]:
    conn = await psycopg.AsyncConnection.connect(target.url, autocommit=True, **target.kwargs())
    await conn.execute(SESSION_SETUP)
    return conn


async def _close(conn: psycopg.AsyncConnection[Any] | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            await conn.close()


class Control:
    def __init__(
        self,
        target: PgTarget,
        *,
        token: str,
        on_change: Callable[[str, int], None],
        on_reconnect: Callable[[], None],
    ) -> None:
        self._target = target
        self._token = token
        self._on_change = on_change
        self._on_reconnect = on_reconnect
        self._listener: psycopg.AsyncConnection[Any] | None = None
        self._lock_conn: psycopg.AsyncConnection[Any] | None = None
        self._owner: str | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- wake-ups ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """LISTEN before returning: nothing committed after ``open`` goes unheard."""
        self._listener = await self._listen()
        self._tasks.append(asyncio.create_task(self._listen_loop(), name="spool-listen"))

    async def _listen(self) -> psycopg.AsyncConnection[Any]:
        conn = await connect(self._target)
        await conn.execute(f"LISTEN {CHANNEL}")
        return conn

    def _heard(self, payload: str) -> None:
        kind, _, rest = payload.partition(":")
        token, _, generation = rest.partition(":")
        if token == self._token:
            return
        self._on_change(kind, int(generation) if generation.isdigit() else 0)

    async def _listen_loop(self) -> None:
        delay = 0.2
        while True:
            conn = self._listener
            try:
                if conn is None:
                    conn = self._listener = await self._listen()
                    log.info("spool wake-ups: listening again")
                    self._on_reconnect()
                delay = 0.2
                async for n in conn.notifies():
                    self._heard(n.payload)
            except (psycopg.Error, OSError) as e:
                log.warning("spool wake-ups: connection lost (%s); reconnecting", " ".join(str(e).split()))
                await _close(conn)
                self._listener = None
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)

    # -- the owner's lock --------------------------------------------------------------------------
    @property
    def owner(self) -> str | None:
        return self._owner

    async def hold_owner(self, owner: str) -> None:
        """Register ``owner`` and hold its lock from now until ``close`` (or death)."""
        conn = await connect(self._target)
        try:
            await self._lock(conn, owner)
        except BaseException:
            await _close(conn)
            raise
        self._owner, self._lock_conn = owner, conn
        self._tasks.append(asyncio.create_task(self._keep_lock(), name="spool-owner-lock"))

    @staticmethod
    async def _lock(conn: psycopg.AsyncConnection[Any], owner: str) -> None:
        """The row and the (session) lock in one transaction: whoever sees the row sees it locked."""
        async with conn.transaction():
            cur = await conn.execute(
                "INSERT INTO relay365.owners (owner, host) VALUES (%s, %s)"
                " ON CONFLICT (owner) DO UPDATE SET host = EXCLUDED.host RETURNING lock_id",
                (owner, socket.gethostname()[:200]),
            )
            row = await cur.fetchone()
            assert row is not None
            await conn.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, row[0]))

    async def _keep_lock(self) -> None:
        assert self._owner is not None
        while True:
            await asyncio.sleep(CHECK_EVERY)
            conn = self._lock_conn
            try:
                if conn is None:
                    conn = await connect(self._target)
                    await self._lock(conn, self._owner)
                    self._lock_conn = conn
                    log.warning("spool owner %s: lock taken again after the connection was lost", self._owner)
                else:
                    await conn.execute("SELECT 1")
            except (psycopg.Error, OSError) as e:
                log.warning(
                    "spool owner %s: lock connection lost (%s); other nodes may take this one for dead",
                    self._owner,
                    " ".join(str(e).split()),
                )
                await _close(conn)
                self._lock_conn = None

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await _close(self._listener)
        if self._lock_conn is not None:
            # Unlock before closing: the server ends the session a moment after the client hangs up,
            # and a recovery in that moment would still find this owner alive.
            with contextlib.suppress(Exception):
                await self._lock_conn.execute("SELECT pg_advisory_unlock_all()")
        await _close(self._lock_conn)
        self._listener = self._lock_conn = None
