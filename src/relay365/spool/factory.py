"""The one place a spool backend is chosen: ``[spool] url`` in relay365.toml.

- ``sqlite:PATH`` (the default, ``sqlite:`` + ``server.spool_dir``): the embedded spool (sqlite.py);
- ``memory:``: the in-memory spool (memory.py), for tests: nothing survives the process;
- ``postgresql://user@host:port/db``: the PostgreSQL spool (postgres.py), shared by several relays;
  the password from ``[spool] password_env``/``password_file`` or libpq's ``PGPASSWORD``/``.pgpass``.

``service/relay.py`` (the server), ``cli.py`` (``relay365 queue``) and the diagnostics open the spool
through here and only here. A new backend is one more entry in ``_BACKENDS``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from relay365.credentials import load_secret
from relay365.errors import ConfigError
from relay365.settings import Settings, redact_url
from relay365.spool.contract import Spool
from relay365.spool.memory import MemorySpool
from relay365.spool.sqlite import SqliteSpool

if TYPE_CHECKING:
    from relay365.spool.pg_connect import PgTarget

KEY = "spool.url"


@dataclass(frozen=True, slots=True)
class SpoolLocation:
    """A parsed ``[spool] url``: the backend and, for SQLite, its directory."""

    scheme: str  # "sqlite", "memory" or "postgresql"
    url: str
    path: Path | None = None


def spool_url(settings: Settings) -> str:
    return settings.spool.url or f"sqlite:{settings.server.spool_dir}"


_SCHEMES = {
    "sqlite:": "sqlite",
    "memory:": "memory",
    "postgresql://": "postgresql",
    "postgres://": "postgresql",
}
_NAMES: dict[str, str] = {}


def _sqlite(where: SpoolLocation, settings: Settings, clock: Callable[[], float]) -> Spool:
    assert where.path is not None
    return SqliteSpool(where.path, clock=clock, min_free=settings.server.spool_min_free)


def _memory(where: SpoolLocation, settings: Settings, clock: Callable[[], float]) -> Spool:
    return MemorySpool(clock=clock)


def pg_target(settings: Settings) -> PgTarget:
    """Where a ``postgresql://`` spool is, with its password (``SecretError`` if it cannot be read)."""
    from relay365.spool.pg_connect import PgTarget  # (psycopg: only for a PostgreSQL spool)

    s = settings.spool
    password = load_secret(s.password) if s.password is not None else None
    return PgTarget(url=s.url, password=password, pool_size=s.pool_size, connect_timeout=s.connect_timeout)


def _postgres(where: SpoolLocation, settings: Settings, clock: Callable[[], float]) -> Spool:
    from relay365.spool.postgres import PgSpool  # (psycopg and its pool: ~14 MB a process)

    return PgSpool(pg_target(settings), clock=clock)


# scheme -> how to make the spool
_BACKENDS: dict[str, Callable[[SpoolLocation, Settings, Callable[[], float]], Spool]] = {
    "sqlite": _sqlite,
    "memory": _memory,
    "postgresql": _postgres,
}


def locate(settings: Settings) -> SpoolLocation:
    """Which backend ``settings`` asks for; ``ConfigError`` for one this build does not have."""
    url = spool_url(settings)
    scheme = next((name for prefix, name in _SCHEMES.items() if url.startswith(prefix)), None)
    if scheme is None:
        raise ConfigError(KEY, _redact(url), "Use sqlite:PATH, memory: or postgresql://user@host/db.")
    if scheme not in _BACKENDS:
        what = _NAMES.get(scheme, f"The {scheme} spool")
        raise ConfigError(KEY, _redact(url), f"{what} is not available in this build; use sqlite:PATH.")
    if scheme == "sqlite":
        raw = url.removeprefix("sqlite:")
        return SpoolLocation(scheme, url, Path(raw) if raw else settings.server.spool_dir)
    return SpoolLocation(scheme, url)


_redact = redact_url


def make_spool(settings: Settings, *, clock: Callable[[], float] = time.time) -> Spool:
    """The spool ``settings`` asks for, not opened yet."""
    where = locate(settings)
    return _BACKENDS[where.scheme](where, settings, clock)


def spool_exists(settings: Settings) -> bool:
    """Has a relay already created this spool? (Admin tools do not create an empty one.)"""
    where = locate(settings)
    if where.scheme == "sqlite":
        assert where.path is not None
        return (where.path / "queue.db").exists()
    return where.scheme in ("memory", "postgresql")  # (PostgreSQL: open() checks the schema)


@asynccontextmanager
async def open_spool(settings: Settings, *, clock: Callable[[], float] = time.time) -> AsyncIterator[Spool]:
    """``async with open_spool(settings) as spool``: opened, and closed again on the way out. It
    does not ``recover`` (that is the delivering process's job): admin tools may use it while the
    server runs."""
    spool = make_spool(settings, clock=clock)
    await spool.open()
    try:
        yield spool
    finally:
        await spool.close()
