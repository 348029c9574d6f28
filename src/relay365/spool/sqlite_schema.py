"""The SQLite spool's tables, and how an existing queue.db is brought up to date.

Schema versions (``PRAGMA user_version``, ``spool/schema_version.py``)::

    0  a new, empty file; or a queue written before versions were recorded (relay365 0.1.0): the first
       release's tables (``_BASE``) with none, some or all of the columns in ``COLUMNS``
    1  the first release's tables + every column in ``COLUMNS`` + the ``control`` table
    2  + ``messages.stuffed``: 1 when the body is in wire form (dot-stuffed, ``spool/wire.py``), 0 for
       the bodies spooled before it (the message itself; delivered as they were, stuffed on the way)

The step from 0 creates what is missing: the base tables, each column of ``COLUMNS`` that is not there
(``ALTER TABLE ... ADD COLUMN``, at the end, in this order), the ``control`` table; so a new and an
upgraded queue have the same columns in the same order, and a queue written by any earlier relay365
is delivered by this one. A later change adds a step (``_STEPS[1]`` to make version 2), never edits one.
A queue with a version above ``SCHEMA.version`` is refused (``SchemaVersionError``), never misread.
Code names its columns (``MESSAGE_COLUMNS``), never ``SELECT *``.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from relay365.spool.schema_version import Schema, check_version, migrate

_BASE = """
CREATE TABLE IF NOT EXISTS messages (
    queue_id TEXT PRIMARY KEY,
    mail_from TEXT NOT NULL,
    device TEXT NOT NULL,
    peer TEXT NOT NULL,
    listener TEXT NOT NULL,
    smtputf8 INTEGER NOT NULL,
    is_dsn INTEGER NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    held INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS recipients (
    queue_id TEXT NOT NULL REFERENCES messages(queue_id) ON DELETE CASCADE,
    pos INTEGER NOT NULL,
    rcpt TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_reply TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (queue_id, pos)
);
CREATE INDEX IF NOT EXISTS recipients_due ON recipients(state, next_attempt);
CREATE TABLE IF NOT EXISTS pacing (key TEXT NOT NULL, at REAL NOT NULL, recipients INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS pacing_at ON pacing(at);
"""

# (table, column, declaration): appended in this order; add new columns at the end.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    # the owner directory under messages/ holding the body ('' = messages/<queue id>, before 2)
    ("messages", "body_dir", "TEXT NOT NULL DEFAULT ''"),
    # the claim: which owner delivers the message, until when (spool/contract.py)
    ("messages", "lease_owner", "TEXT NOT NULL DEFAULT ''"),
    ("messages", "lease_until", "REAL NOT NULL DEFAULT 0"),
    # header facts read while DATA streamed (the console's queue view and the tracking log)
    ("messages", "subject", "TEXT NOT NULL DEFAULT ''"),
    ("messages", "message_id", "TEXT NOT NULL DEFAULT ''"),
    # the transport of each recipient's last attempt ('' before the first)
    ("recipients", "transport", "TEXT NOT NULL DEFAULT ''"),
)

_AFTER_COLUMNS = """
CREATE INDEX IF NOT EXISTS messages_leased ON messages(lease_owner) WHERE lease_owner != '';
CREATE TABLE IF NOT EXISTS control (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO control VALUES ('flush_generation', 0);
"""

MESSAGE_COLUMNS = (
    "m.queue_id, m.mail_from, m.device, m.peer, m.listener, m.smtputf8, m.is_dsn, m.size,"
    " m.received_at, m.held, m.body_dir, m.lease_owner, m.lease_until, m.subject, m.message_id,"
    " m.stuffed"
)
RECIPIENT_COLUMNS = "rcpt, state, attempts, next_attempt, last_reply, transport"
INSERT_MESSAGE = (
    "INSERT INTO messages (queue_id, mail_from, device, peer, listener, smtputf8, is_dsn, size,"
    " received_at, body_dir, subject, message_id, stuffed) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,1)"
)


def connect(db_path: Path) -> sqlite3.Connection:
    """Open (creating it 0600) and configure queue.db, and bring its schema up to date; a queue of a
    newer relay365 is refused (``SchemaVersionError``) before anything is written to it."""
    if db_path.exists():
        check_version(SCHEMA, db_path)  # not even journal_mode is set on a queue we cannot read
    # SQLite gives the -wal and -shm files the database file's mode, so create it 0600 first.
    os.close(os.open(db_path, os.O_RDWR | os.O_CREAT, 0o600))
    for suffix in ("", "-wal", "-shm"):
        path = db_path.with_name(db_path.name + suffix)
        if path.exists():
            os.chmod(path, 0o600)
    conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        migrate(conn, SCHEMA, db_path)
    except BaseException:
        conn.close()
        raise
    return conn


def _v0_to_v1(conn: sqlite3.Connection) -> None:
    """Inside the upgrade's transaction: create what is missing (a new file gets everything)."""
    for statement in _statements(_BASE):
        conn.execute(statement)
    for table, column, decl in COLUMNS:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
    for statement in _statements(_AFTER_COLUMNS):
        conn.execute(statement)


def _v1_to_v2(conn: sqlite3.Connection) -> None:
    """The bodies already spooled hold the message itself (0); new ones are in wire form (1)."""
    conn.execute("ALTER TABLE messages ADD COLUMN stuffed INTEGER NOT NULL DEFAULT 0")


SCHEMA = Schema(
    what="the queue",
    version=2,
    steps={0: _v0_to_v1, 1: _v1_to_v2},
    history={
        0: "a new file, or a queue from before schema versions",
        1: "owners, claims, header facts",
        2: "bodies in wire form",
    },
)


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def bump_flush(conn: sqlite3.Connection) -> int:
    """Inside a write transaction: one more flush request; returns the new generation."""
    row = conn.execute(
        "UPDATE control SET value = value + 1 WHERE key = 'flush_generation' RETURNING value"
    ).fetchone()
    return int(row[0])


def flush_generation(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM control WHERE key = 'flush_generation'").fetchone()
    return int(row[0]) if row else 0
