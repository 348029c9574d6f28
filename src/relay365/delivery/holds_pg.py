"""Upstream hold-backs shared by every relay on one PostgreSQL spool (the ``HoldBoard``, holds.py):
one table, ``upstream_holds`` (name, until, why). A flush (``relay365 queue retry``) empties it in
the transaction that bumps the flush generation (postgres.py), so every node revives the upstream.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from relay365.spool.postgres import PgSpool


class PgHoldBoard:
    def __init__(self, spool: PgSpool) -> None:
        self._spool = spool

    async def publish(self, holds: dict[str, tuple[float, str]]) -> None:
        if not holds:
            return

        async def write(conn: AsyncConnection[Any]) -> None:
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO relay365.upstream_holds (name, until, reason) VALUES (%s, %s, %s)"
                    " ON CONFLICT (name) DO UPDATE SET reason = EXCLUDED.reason,"
                    " until = greatest(upstream_holds.until, EXCLUDED.until)",
                    [(name, until, why[:500]) for name, (until, why) in sorted(holds.items())],
                )

        await self._spool.transaction(write)

    async def current(self) -> dict[str, float]:
        async def read(conn: AsyncConnection[Any]) -> dict[str, float]:
            cur = await conn.execute("SELECT name, until FROM relay365.upstream_holds")
            return {str(name): float(until) for name, until in await cur.fetchall()}

        return await self._spool.statement(read)
