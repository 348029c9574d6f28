"""Pacing shared by every relay on one PostgreSQL spool (the ``PaceStore`` seam, pacestore.py).

State, in the spool's database:
- ``pacing``: messages that reached the upstream, (key, accepted at, recipients): the windows;
- ``pace_sessions``: messages on their way, each holding one of the mailbox's session slots until
  settled, or until ``expires`` when its node died (renewed every third of ``SESSION_LEASE``);
- ``pace_keys``: one row per mailbox key, locked (``SELECT ... FOR UPDATE``) by every ``reserve`` of
  that key, which makes reserving atomic across nodes; it also holds ``paused_until`` (a throttling
  reply seen by any node pauses the mailbox for all).

Everything is on the nodes' clocks (like the spool's leases): keep them in sync (NTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from psycopg import AsyncConnection

from relay365.delivery.pacestore import SESSION_LEASE, Reservation
from relay365.delivery.pacing import Headroom, headroom_of, wait_for
from relay365.errors import SpoolError
from relay365.spool.contract import Spool
from relay365.spool.model import PaceEvent
from relay365.spool.postgres import PgSpool
from relay365.transports.base import PaceLimits

log = logging.getLogger(__name__)
Conn = AsyncConnection[Any]
HISTORY = 86_400.0


async def _state(
    conn: Conn, key: str, limits: PaceLimits, now: float
) -> tuple[list[tuple[float, float]], int, float]:
    """(sent and in flight in the last day, sessions in use, paused until) for ``key``."""
    cur = await conn.execute(
        "SELECT at, recipients FROM relay365.pacing WHERE key = %s AND at > %s"
        " UNION ALL SELECT started_at, recipients FROM relay365.pace_sessions"
        " WHERE key = %s AND expires > %s",
        (key, now - limits.day, key, now),
    )
    sent = [(float(t), float(n)) for t, n in await cur.fetchall()]
    cur = await conn.execute(
        "SELECT (SELECT count(*) FROM relay365.pace_sessions WHERE key = %s AND expires > %s),"
        " (SELECT paused_until FROM relay365.pace_keys WHERE key = %s)",
        (key, now, key),
    )
    row = await cur.fetchone()
    assert row is not None
    return sent, int(row[0]), float(row[1] or 0.0)


async def _extend(conn: Conn, *, ids: list[int], until: float) -> None:
    await conn.execute("UPDATE relay365.pace_sessions SET expires = %s WHERE id = ANY(%s)", (until, ids))


class PgPaceStore:
    shared = True

    def __init__(self, spool: PgSpool, *, owner: str, clock: Callable[[], float] = time.time) -> None:
        self._spool = spool
        self._owner = owner
        self._clock = clock
        self._open: set[int] = set()
        self._renewer: asyncio.Task[None] | None = None

    async def restore(self, spool: Spool) -> None:
        return None  # the windows are in the database already

    async def reserve(self, key: str, limits: PaceLimits, recipients: int) -> Reservation | float:
        now = self._clock()

        async def decide(conn: Conn) -> Reservation | float:
            await conn.execute(
                "INSERT INTO relay365.pace_keys (key) VALUES (%s) ON CONFLICT (key) DO NOTHING", (key,)
            )
            await conn.execute("SELECT 1 FROM relay365.pace_keys WHERE key = %s FOR UPDATE", (key,))
            sent, active, paused_until = await _state(conn, key, limits, now)
            wait = wait_for(
                now=now,
                limits=limits,
                recipients=recipients,
                sent=sent,
                active=active,
                paused_until=paused_until,
            )
            if wait > 0:
                return wait
            cur = await conn.execute(
                "INSERT INTO relay365.pace_sessions (key, owner, started_at, recipients, expires)"
                " VALUES (%s, %s, %s, %s, %s) RETURNING id",
                (key, self._owner, now, recipients, now + SESSION_LEASE),
            )
            row = await cur.fetchone()
            assert row is not None
            return Reservation(key, recipients, int(row[0]))

        got = await self._spool.transaction(decide)
        if isinstance(got, Reservation):
            assert isinstance(got.handle, int)
            self._open.add(got.handle)
            if self._renewer is None or self._renewer.done():
                self._renewer = asyncio.create_task(self._renew(), name="pace-slot-renewal")
        return got

    async def settle(self, reservation: Reservation, *, delivered: int) -> PaceEvent | None:
        assert isinstance(reservation.handle, int)
        self._open.discard(reservation.handle)
        now = self._clock()

        async def end(conn: Conn) -> None:
            await conn.execute("DELETE FROM relay365.pace_sessions WHERE id = %s", (reservation.handle,))
            if delivered:
                await conn.execute(
                    "INSERT INTO relay365.pacing (key, at, recipients) VALUES (%s, %s, %s)",
                    (reservation.key, now, delivered),
                )
                await conn.execute("DELETE FROM relay365.pacing WHERE at < %s", (now - HISTORY,))

        try:
            await self._spool.transaction(end)
        except SpoolError as e:
            # The slot expires by itself; the event goes with the outcome (which the recorder keeps
            # until the database is back), so the windows still count the message.
            log.warning("pacing of %s not settled now (%s); recorded with the outcome", reservation.key, e)
            return PaceEvent(reservation.key, now, delivered) if delivered else None
        return None

    async def pause(self, key: str, seconds: float) -> None:
        until = self._clock() + seconds
        with contextlib.suppress(SpoolError):
            await self._spool.statement(
                lambda conn: conn.execute(
                    "INSERT INTO relay365.pace_keys (key, paused_until) VALUES (%s, %s) ON CONFLICT (key)"
                    " DO UPDATE SET paused_until = greatest(pace_keys.paused_until, EXCLUDED.paused_until)",
                    (key, until),
                )
            )

    async def headroom(self, key: str, limits: PaceLimits) -> Headroom:
        now = self._clock()
        sent, active, paused_until = await self._spool.statement(lambda conn: _state(conn, key, limits, now))
        return headroom_of(now=now, limits=limits, sent=sent, active=active, paused_until=paused_until)

    async def _renew(self) -> None:
        """Keep this node's slots from expiring while their messages are on their way."""
        while self._open:
            await asyncio.sleep(SESSION_LEASE / 3)
            ids = sorted(self._open)
            if not ids:
                continue
            try:
                await self._spool.statement(
                    functools.partial(_extend, ids=ids, until=self._clock() + SESSION_LEASE)
                )
            except SpoolError as e:
                log.warning("pacing: %d session slot(s) not renewed: %s", len(ids), e)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None
