"""Connecting to the PostgreSQL spool: the URL, the password, the pool, and mapping psycopg's errors.

The password never sits in relay365.toml: a URL carrying one is refused (``ConfigError``, the
password masked). It comes from ``[spool] password_env``/``password_file`` or libpq's own
``PGPASSWORD``/``~/.pgpass`` (``PGPASSFILE``). Every connection runs with ``synchronous_commit = on``
whatever the server's default (a ``250`` is a promise: RFC 5321 section 6.1), in the ``relay365``
schema, with TCP keepalives so a vanished peer is noticed within about half a minute.

Errors: a connection that fails or breaks, a pool that has no connection in time: ``SpoolIOError``
(ingress answers ``451 4.3.0``, delivery stops and probes); PostgreSQL's ``disk_full`` (53100):
``SpoolFullError`` (``452 4.3.1``). The pool replaces broken connections by itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors

from relay365.errors import SpoolError, SpoolFullError, SpoolIOError
from relay365.settings import redact_url

log = logging.getLogger(__name__)
# libpq keepalives (client side) and the server's for this session: a dead peer is found in ~25 s.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
SESSION_SETUP = (
    b"SET synchronous_commit TO on; SET search_path TO relay365;"
    b" SET tcp_keepalives_idle TO 10; SET tcp_keepalives_interval TO 5; SET tcp_keepalives_count TO 3"
)


redact = redact_url


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/") or "(the user's default database)"


@dataclass(frozen=True, slots=True, kw_only=True)
class PgTarget:
    """Where the PostgreSQL spool is: the URL (no password) and the password, if not libpq's own."""

    url: str
    password: str | None = None
    pool_size: int = 10
    connect_timeout: float = 5.0

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {**KEEPALIVES, "connect_timeout": max(1, int(self.connect_timeout))}
        if self.password is not None:
            out["password"] = self.password
        out["application_name"] = "relay365"
        return out

    def shown(self) -> str:
        return redact(self.url)


async def setup_session(conn: psycopg.AsyncConnection[Any]) -> None:
    """The pool's ``configure``: every connection durable-on-commit, in relay365's schema."""
    await conn.set_autocommit(True)
    await conn.execute(SESSION_SETUP)


def make_pool(
    target: PgTarget,
    *,
    name: str,
    min_size: int = 1,
    configure: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] = setup_session,
) -> psycopg_pool.AsyncConnectionPool:
    """A pool (not opened yet) that checks a connection before handing it out and replaces broken
    ones: after an outage the first use reconnects, no restart needed."""
    return psycopg_pool.AsyncConnectionPool(
        target.url,
        kwargs=target.kwargs(),
        min_size=min(min_size, target.pool_size),
        max_size=target.pool_size,
        open=False,
        name=name,
        configure=configure,
        check=psycopg_pool.AsyncConnectionPool.check_connection,
        timeout=max(2.0, target.connect_timeout * 2),
        # Give up a reconnection after a few tries (1 s, 2 s apart): the next use tries again at
        # once, so a database that is back is used within seconds, however long it was away (the
        # default backs off for minutes).
        reconnect_timeout=3.0,
    )


def spool_error(e: BaseException, what: str = "PostgreSQL spool") -> SpoolError:
    """psycopg's and the pool's errors as the spool's own (no password ever is in their text)."""
    if isinstance(e, SpoolError):
        return e
    if isinstance(e, pg_errors.DiskFull):
        return SpoolFullError(f"spool full: PostgreSQL: {_one_line(e)}")
    if isinstance(e, psycopg_pool.PoolTimeout):
        return SpoolIOError(f"{what}: no database connection in time ({_one_line(e)})")
    return SpoolIOError(f"{what}: {type(e).__name__}: {_one_line(e)}")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:500] or type(e).__name__


@contextlib.contextmanager
def mapped(what: str = "PostgreSQL spool") -> Iterator[None]:
    """Turn psycopg's errors raised inside into ``SpoolError``."""
    try:
        yield
    except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as e:
        raise spool_error(e, what) from e
