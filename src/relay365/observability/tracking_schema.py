"""The tracking log's table and indexes (``tracking.db``), and how an existing file is brought up to date.

Schema versions (``PRAGMA user_version``, ``spool/schema_version.py``)::

    0  a new, empty file; or a tracking log from before schema versions were recorded: the ``events``
       table, and ``events_at`` on ``(at)`` alone as the first console release made it, or on
       ``(at, kind)`` as later ones did
    1  ``events`` + every index below, ``events_at`` on ``(at, kind)`` (it covers the overview counts)

Why a version was needed here: ``CREATE INDEX IF NOT EXISTS events_at`` keeps an index of that name
whatever its columns, so a file made by the first release kept the narrow index for ever, and the
overview counted from the table instead. The step from 0 rebuilds ``events_at`` when its columns are
not the current ones. A tracking log with a version above this release's is refused, never misread:
it only holds history (no mail), so the error also says it may be moved aside.
"""

from __future__ import annotations

import sqlite3

from relay365.spool.schema_version import Schema

_EVENTS = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    queue_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    device TEXT NOT NULL,
    peer TEXT NOT NULL,
    listener TEXT NOT NULL,
    transport TEXT NOT NULL,
    reply TEXT NOT NULL,
    actor TEXT NOT NULL,
    detail TEXT NOT NULL
)
"""
# name -> (columns, the statement): events_at covers the overview counts (kind per time range)
INDEXES: dict[str, tuple[tuple[str, ...], str]] = {
    "events_at": (("at", "kind"), "CREATE INDEX events_at ON events(at, kind)"),
    "events_queue_id": (("queue_id",), "CREATE INDEX events_queue_id ON events(queue_id)"),
    "events_message_id": (("message_id",), "CREATE INDEX events_message_id ON events(message_id)"),
    "events_recipient": (
        ("recipient",),
        "CREATE INDEX events_recipient ON events(recipient COLLATE NOCASE)",
    ),
    "events_sender": (("sender",), "CREATE INDEX events_sender ON events(sender COLLATE NOCASE)"),
    "events_device": (("device",), "CREATE INDEX events_device ON events(device)"),
}


def index_columns(conn: sqlite3.Connection, name: str) -> tuple[str, ...]:
    """The columns of index ``name`` in order (empty when there is no such index)."""
    return tuple(str(row[2]) for row in conn.execute(f"PRAGMA index_info({name})"))


def _v0_to_v1(conn: sqlite3.Connection) -> None:
    """Inside the upgrade's transaction: the table if missing; each index made, or rebuilt when its
    columns are not the current ones."""
    conn.execute(_EVENTS)
    for name, (columns, create) in INDEXES.items():
        have = index_columns(conn, name)
        if have == columns:
            continue
        if have:
            conn.execute(f"DROP INDEX {name}")
        conn.execute(create)


SCHEMA = Schema(
    what="the tracking log",
    version=1,
    steps={0: _v0_to_v1},
    history={0: "a new file, or a tracking log from before schema versions", 1: "events_at on (at, kind)"},
    aside=(
        "The tracking log holds only message trace history (no mail): to start without it, move"
        " tracking.db (and its -wal and -shm files) aside."
    ),
)
