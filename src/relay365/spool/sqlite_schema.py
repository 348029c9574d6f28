"""The SQLite spool's tables, and how an existing queue.db is brought up to date.

The base tables are those of the first release; every column added since is listed in ``COLUMNS``
and added with ``ALTER TABLE`` when missing, so a new and an upgraded database have the same columns
in the same order, and a queue written by an older relay365 is delivered by this one. Code names its
columns (``MESSAGE_COLUMNS``), never ``SELECT *``.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

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
    # 1: the body is in wire form, dot-stuffed (spool/wire.py); 0: the message itself (before 3)
    ("messages", "stuffed", "INTEGER NOT NULL DEFAULT 0"),
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
    """Open (creating it 0600) and configure queue.db, and bring its schema up to date."""
    # SQLite gives the -wal and -shm files the database file's mode, so create it 0600 first.
    os.close(os.open(db_path, os.O_RDWR | os.O_CREAT, 0o600))
    for suffix in ("", "-wal", "-shm"):
        path = db_path.with_name(db_path.name + suffix)
        if path.exists():
            os.chmod(path, 0o600)
    conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    upgrade(conn)
    return conn


def upgrade(conn: sqlite3.Connection) -> None:
    """Create what is missing, in one transaction (two processes opening a new spool at once are
    serialised by the write lock; the loser finds everything there)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _statements(_BASE):
            conn.execute(statement)
        for table, column, decl in COLUMNS:
            have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        for statement in _statements(_AFTER_COLUMNS):
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


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
