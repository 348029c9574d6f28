"""Schema versions of relay365's SQLite databases (``queue.db``, ``tracking.db``): each file says which
layout it has, an older one is upgraded in place when opened, and a newer one is refused, never misread.

The version is SQLite's own ``PRAGMA user_version`` (https://www.sqlite.org/pragma.html#pragma_user_version:
an integer in the database header that SQLite itself never uses), so no table is needed to hold it and
any ``sqlite3`` shell shows it. ``0`` is both a new, empty file and a database written before relay365
recorded versions; the step from 0 therefore creates what is missing rather than assuming a layout.

Opening a database (``migrate``):

* version == this release's: nothing is written (no write lock: ``relay365 queue`` opens the queue of
  a running server without waiting for it);
* older: every step from that version to this one runs in ONE transaction under the write lock
  (``BEGIN IMMEDIATE``), the version is written in the same transaction, and the version is read again
  once the lock is held, so two processes opening an old file at once upgrade it once. A step that
  fails rolls the whole upgrade back: the file stays as the older release left it;
* newer: ``SchemaVersionError`` before anything is written. A newer release may have changed what a
  column means; guessing would risk delivering the wrong mail or losing some.

``read_version`` answers the same question read-only (the preflight, ``config check``).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from relay365 import __version__
from relay365.errors import SchemaVersionError

log = logging.getLogger(__name__)

Step = Callable[[sqlite3.Connection], None]


@dataclass(frozen=True, slots=True)
class Schema:
    """One database's layout history. ``steps[n]`` turns version ``n`` into ``n + 1``; ``version`` is
    what this release writes (``len(steps)``, checked)."""

    what: str  # "the queue", "the tracking log": named in messages
    version: int
    steps: Mapping[int, Step]
    history: Mapping[int, str]  # version -> which releases wrote it (for the log and the errors)
    aside: str = ""  # what else the admin may do with a too-new file (the tracking log: move it)

    def __post_init__(self) -> None:
        if sorted(self.steps) != list(range(self.version)):
            raise ValueError(f"{self.what}: steps must lead from 0 to {self.version}")


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def too_new(schema: Schema, path: Path, found: int) -> SchemaVersionError:
    aside = f" {schema.aside}" if schema.aside else ""
    return SchemaVersionError(
        f"{path} was written by a newer relay365: {schema.what} has schema version {found}, and relay365"
        f" {__version__} knows versions up to {schema.version}. It is left untouched. Run the relay365"
        f" release that wrote it (or a newer one): 'pipx upgrade relay365', or 'pip install --upgrade"
        f" relay365' in the relay's venv.{aside}",
        found=found,
        supported=schema.version,
    )


def migrate(conn: sqlite3.Connection, schema: Schema, path: Path) -> int:
    """Bring the open database ``conn`` (at ``path``) to ``schema.version``; return the version it
    had. ``conn`` must be in autocommit mode (``isolation_level=None``)."""
    found = user_version(conn)
    if found == schema.version:
        return found
    if found > schema.version:
        raise too_new(schema, path, found)
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = user_version(conn)  # another process may have upgraded it meanwhile
        if found > schema.version:
            raise too_new(schema, path, found)
        empty = conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
        for n in range(found, schema.version):
            schema.steps[n](conn)
        # PRAGMA takes no parameters; the value is this module's own integer.
        conn.execute(f"PRAGMA user_version = {int(schema.version)}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if empty:
        log.debug("%s: %s created (schema version %d)", path, schema.what, schema.version)
    elif found != schema.version:
        log.info(
            "%s: %s upgraded from schema version %d (%s) to %d (%s)",
            path,
            schema.what,
            found,
            schema.history.get(found, "?"),
            schema.version,
            schema.history.get(schema.version, "?"),
        )
    return found


def read_version(path: Path) -> int | None:
    """The schema version of the database file at ``path``, read-only (the file is not created, nothing
    is written); None when there is no such file."""
    if not path.is_file():
        return None
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return user_version(conn)
    finally:
        conn.close()


def check_version(schema: Schema, path: Path) -> None:
    """``SchemaVersionError`` when the file at ``path`` is newer than this release reads (read-only)."""
    found = read_version(path)
    if found is not None and found > schema.version:
        raise too_new(schema, path, found)
