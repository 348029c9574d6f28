"""Checking a PostgreSQL spool from the outside (``config check``, serve's preflight, ``doctor``): can
we connect, which server version, which schema version; nothing is changed."""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg

from relay365.errors import SpoolIOError, SpoolSchemaError
from relay365.spool import pg_schema as schema
from relay365.spool.pg_connect import PgTarget, setup_session


@dataclass(frozen=True, slots=True)
class PgStatus:
    server: str  # e.g. "15.18"
    server_version: int  # e.g. 150018
    schema_version: int | None  # None: no relay365 schema yet
    server_synchronous_commit: str  # the database's default (relay365 sets "on" for its sessions)
    round_trip_ms: float

    def problems(self, shown_url: str) -> list[str]:
        """What stops a node from starting on this database, in the words ``open`` would use."""
        out = []
        try:
            schema.check_server(self.server_version)
        except SpoolSchemaError as e:
            out.append(f"spool.url: {e}")
        try:
            schema.check_version(self.schema_version, shown_url)
        except SpoolSchemaError as e:
            out.append(f"spool.url: {e}")
        return out


async def probe(target: PgTarget) -> PgStatus:
    """Connect once and look; ``SpoolIOError`` (naming the URL, never a password) when we cannot."""
    try:
        conn = await psycopg.AsyncConnection.connect(target.url, autocommit=True, **target.kwargs())
    except psycopg.Error as e:
        raise SpoolIOError(
            f"spool.url: cannot connect to {target.shown()}: {' '.join(str(e).split())}"
        ) from e
    try:
        cur = await conn.execute("SHOW synchronous_commit")
        row = await cur.fetchone()
        default = str(row[0]) if row else "?"
        await setup_session(conn)
        start = time.perf_counter()
        await conn.execute("SELECT 1")
        rtt = (time.perf_counter() - start) * 1000
        version = await schema.aschema_version(conn)
        info = conn.info
        text = f"{info.server_version // 10000}.{info.server_version % 10000}"
        return PgStatus(text, info.server_version, version, default, rtt)
    except psycopg.Error as e:
        raise SpoolIOError(f"spool.url: {target.shown()}: {' '.join(str(e).split())}") from e
    finally:
        await conn.close()
