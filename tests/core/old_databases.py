"""Databases as earlier relay365 releases wrote them, for the upgrade tests (tests/core/test_upgrades.py).

``first_release_queue`` builds a spool exactly as relay365's first release left it: the DDL and the
INSERTs below are copied from that release's ``spool/sqlite.py`` (``git show a605bca:src/relay365/spool/
sqlite.py``: ``_SCHEMA``, ``_connect``, ``_insert_rows`` and ``record``): no ``user_version``, WAL mode,
bodies at ``messages/<queue id>``, recipients in the states that release recorded (a delivered one stays
in its row until every recipient of the message is final), a pacing row per delivered message.

``first_tracking_log`` builds a tracking.db as the first release with a tracking log wrote it (``git show
ee821ef:src/relay365/observability/tracking_sqlite.py``): ``events_at`` on ``(at)`` alone.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

# a605bca:src/relay365/spool/sqlite.py, _SCHEMA (verbatim)
FIRST_RELEASE_QUEUE_DDL = """
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

# ee821ef:src/relay365/observability/tracking_sqlite.py, _SCHEMA (verbatim)
FIRST_TRACKING_DDL = """
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
);
CREATE INDEX IF NOT EXISTS events_at ON events(at);
CREATE INDEX IF NOT EXISTS events_queue_id ON events(queue_id);
CREATE INDEX IF NOT EXISTS events_message_id ON events(message_id);
CREATE INDEX IF NOT EXISTS events_recipient ON events(recipient COLLATE NOCASE);
CREATE INDEX IF NOT EXISTS events_sender ON events(sender COLLATE NOCASE);
CREATE INDEX IF NOT EXISTS events_device ON events(device);
"""


@dataclass(frozen=True)
class OldRecipient:
    rcpt: str
    state: str = "queued"  # queued | deferred | delivered | bounced (that release's RcptState values)
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str = ""


@dataclass(frozen=True)
class OldMessage:
    queue_id: str  # that release's format: 11 hex digits of milliseconds + 8 random hex digits
    mail_from: str
    recipients: tuple[OldRecipient, ...]
    body: bytes
    received_at: float
    held: bool = False
    device: str = "printer"
    peer: str = "10.0.0.9"
    listener: str = "lan"


def _connect(db: Path) -> sqlite3.Connection:
    # a605bca SqliteSpool._connect: the same pragmas, then the schema script
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def first_release_queue(
    directory: Path, messages: list[OldMessage], *, pacing: list[tuple[str, float, int]]
) -> Path:
    """``directory`` as the first release's spool: queue.db (its DDL, its rows) and the bodies at
    ``messages/<queue id>``; returns the queue.db path."""
    (directory / "messages").mkdir(parents=True, mode=0o700)
    db = directory / "queue.db"
    conn = _connect(db)
    try:
        conn.executescript(FIRST_RELEASE_QUEUE_DDL)
        conn.execute("BEGIN IMMEDIATE")
        for m in messages:
            # a605bca _insert_rows: "INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?,0)"
            conn.execute(
                "INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?,0)",
                (m.queue_id, m.mail_from, m.device, m.peer, m.listener, 0, 0, len(m.body), m.received_at),
            )
            conn.executemany(
                "INSERT INTO recipients (queue_id, pos, rcpt, state, next_attempt) VALUES (?,?,?,?,?)",
                [(m.queue_id, i, r.rcpt, "queued", m.received_at) for i, r in enumerate(m.recipients)],
            )
            # a605bca record(): the outcome of an attempt (state, attempts+1, next attempt, reply)
            for r in m.recipients:
                if r.state != "queued" or r.attempts:
                    conn.execute(
                        "UPDATE recipients SET state=?, attempts=attempts+?, next_attempt=?,"
                        " last_reply=? WHERE queue_id=? AND rcpt=? AND state IN (?,?)",
                        (r.state, r.attempts, r.next_attempt, r.last_reply, m.queue_id, r.rcpt,
                         "queued", "deferred"),
                    )  # fmt: skip
            if m.held:  # a605bca hold(): "UPDATE messages SET held=? WHERE queue_id=?"
                conn.execute("UPDATE messages SET held=? WHERE queue_id=?", (1, m.queue_id))
            (directory / "messages" / m.queue_id).write_bytes(m.body)
        conn.executemany("INSERT INTO pacing VALUES (?,?,?)", pacing)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return db


def first_tracking_log(path: Path, rows: list[tuple[float, str, str, str]]) -> Path:
    """A tracking.db as its first release made it; ``rows``: (at, kind, queue_id, recipient)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(FIRST_TRACKING_DDL)
        conn.executemany(
            "INSERT INTO events (at, kind, queue_id, message_id, subject, sender, recipient, device, peer,"
            " listener, transport, reply, actor, detail) VALUES (?,?,?,'','','s@contoso.com',?,'printer',"
            "'10.0.0.9','lan','up','250 ok','','')",
            rows,
        )
    finally:
        conn.close()
    return path
