"""The PostgreSQL spool's tables and their migrations, with a version table.

Everything lives in the schema ``relay365`` of the database the URL names (so it can share a database
with other applications). ``relay365 spool migrate`` applies the migrations this build knows, in one
transaction, serialised by an advisory lock (two admins migrating at once: the second finds nothing
left to do). Nodes never migrate by themselves: they check the version at ``open`` and refuse a
database without relay365's schema, with an older one, or with a newer one (``SpoolSchemaError``
naming the command to run). A migration is appended to ``MIGRATIONS``, never edited once released.
"""

from __future__ import annotations

from typing import Any

import psycopg

from relay365 import __version__
from relay365.errors import SpoolSchemaError

SCHEMA = "relay365"
_MIGRATE_LOCK = 0x52333635  # pg_advisory_xact_lock key of ``migrate`` ("R365")

# (version, statements). Version 1: the queue (messages, recipients, bodies in chunks), owners and
# claims, the flush generation, pacing (sent history, shared session slots, pauses), shared upstream
# holds, and the tracking log.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
CREATE TABLE relay365.messages (
    queue_id text PRIMARY KEY,
    mail_from text NOT NULL,
    device text NOT NULL,
    peer text NOT NULL,
    listener text NOT NULL,
    smtputf8 boolean NOT NULL,
    is_dsn boolean NOT NULL,
    size bigint NOT NULL,
    received_at double precision NOT NULL,
    held boolean NOT NULL DEFAULT false,
    subject text NOT NULL DEFAULT '',
    message_id text NOT NULL DEFAULT '',
    lease_owner text NOT NULL DEFAULT '',
    lease_until double precision NOT NULL DEFAULT 0,
    -- the earliest next_attempt of a recipient still open (NULL: none), kept with every change
    -- of the recipients, so claims and the next wake-up read one index
    next_due double precision
);
CREATE INDEX messages_due ON relay365.messages (next_due, queue_id) WHERE NOT held AND next_due IS NOT NULL;
CREATE INDEX messages_leased ON relay365.messages (lease_owner) WHERE lease_owner <> '';
CREATE TABLE relay365.recipients (
    queue_id text NOT NULL REFERENCES relay365.messages (queue_id) ON DELETE CASCADE,
    pos integer NOT NULL,
    rcpt text NOT NULL,
    state text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt double precision NOT NULL,
    last_reply text NOT NULL DEFAULT '',
    transport text NOT NULL DEFAULT '',
    PRIMARY KEY (queue_id, pos)
);
CREATE INDEX recipients_state ON relay365.recipients (state, queue_id);
-- Message bodies in chunks (written while DATA streams in, before the queue entry exists).
-- Stored uncompressed (attachments are compressed already; EXTERNAL saves the CPU).
CREATE TABLE relay365.bodies (
    queue_id text NOT NULL,
    seq integer NOT NULL,
    chunk bytea NOT NULL,
    PRIMARY KEY (queue_id, seq)
);
ALTER TABLE relay365.bodies ALTER COLUMN chunk SET STORAGE EXTERNAL;
-- A body being received: which owner writes it (removed by recover when that owner is dead).
CREATE TABLE relay365.incoming (
    queue_id text PRIMARY KEY,
    owner text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX incoming_owner ON relay365.incoming (owner);
-- Live owners hold the session advisory lock (classid 0x52333635, objid lock_id) while running.
CREATE SEQUENCE relay365.owner_lock_ids AS integer CYCLE;
CREATE TABLE relay365.owners (
    owner text PRIMARY KEY,
    lock_id integer NOT NULL UNIQUE DEFAULT nextval('relay365.owner_lock_ids'),
    host text NOT NULL DEFAULT '',
    started_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE relay365.control (key text PRIMARY KEY, value bigint NOT NULL);
INSERT INTO relay365.control VALUES ('flush_generation', 0);
-- Messages sent per upstream mailbox/app (pacing windows), and the shared pacing state.
CREATE TABLE relay365.pacing (
    key text NOT NULL,
    at double precision NOT NULL,
    recipients integer NOT NULL
);
CREATE INDEX pacing_key_at ON relay365.pacing (key, at);
CREATE INDEX pacing_at ON relay365.pacing (at);
CREATE TABLE relay365.pace_keys (
    key text PRIMARY KEY,
    paused_until double precision NOT NULL DEFAULT 0
);
CREATE TABLE relay365.pace_sessions (
    id bigserial PRIMARY KEY,
    key text NOT NULL,
    owner text NOT NULL,
    started_at double precision NOT NULL,
    recipients integer NOT NULL,
    expires double precision NOT NULL
);
CREATE INDEX pace_sessions_key ON relay365.pace_sessions (key);
-- Upstreams held back as unreachable, shared by every node.
CREATE TABLE relay365.upstream_holds (
    name text PRIMARY KEY,
    until double precision NOT NULL,
    reason text NOT NULL DEFAULT ''
);
-- The tracking log (message trace and audit log) of every node.
CREATE TABLE relay365.tracking_events (
    id bigserial PRIMARY KEY,
    at double precision NOT NULL,
    kind text NOT NULL,
    queue_id text NOT NULL,
    message_id text NOT NULL,
    subject text NOT NULL,
    sender text NOT NULL,
    recipient text NOT NULL,
    device text NOT NULL,
    peer text NOT NULL,
    listener text NOT NULL,
    transport text NOT NULL,
    reply text NOT NULL,
    actor text NOT NULL,
    detail text NOT NULL
);
CREATE INDEX tracking_at ON relay365.tracking_events (at, kind);
CREATE INDEX tracking_queue_id ON relay365.tracking_events (queue_id);
CREATE INDEX tracking_message_id ON relay365.tracking_events (message_id);
CREATE INDEX tracking_recipient ON relay365.tracking_events (lower(recipient));
CREATE INDEX tracking_sender ON relay365.tracking_events (lower(sender));
CREATE INDEX tracking_device ON relay365.tracking_events (device);
""",
    ),
    # Version 2: the message trace follower's work (tracing/work_pg.py), shared by the nodes as the
    # tracking log is: one row per recipient handed to Microsoft 365, claimed with owner and lease;
    # the intake's cursor; the one node that asks Microsoft's trace at a time.
    (
        2,
        """
CREATE TABLE relay365.m365_follow (
    queue_id text NOT NULL,
    recipient text NOT NULL,
    message_id text NOT NULL,
    sender text NOT NULL,
    subject text NOT NULL,
    device text NOT NULL,
    transport text NOT NULL,
    route text NOT NULL,
    sent_at double precision NOT NULL,
    due double precision NOT NULL,
    status text NOT NULL,
    trace_id text NOT NULL,
    received_at double precision NOT NULL,
    from_ip text NOT NULL,
    checks integer NOT NULL,
    done boolean NOT NULL,
    details_due boolean NOT NULL,
    owner text NOT NULL DEFAULT '',
    lease_until double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (queue_id, recipient)
);
CREATE INDEX m365_follow_due ON relay365.m365_follow (due, queue_id, recipient) WHERE NOT done;
CREATE INDEX m365_follow_sent ON relay365.m365_follow (sent_at);
CREATE INDEX m365_follow_owner ON relay365.m365_follow (owner) WHERE owner <> '';
CREATE TABLE relay365.m365_follow_state (name text PRIMARY KEY, value double precision NOT NULL);
CREATE TABLE relay365.m365_follow_leader (
    name text PRIMARY KEY,
    owner text NOT NULL,
    lease_until double precision NOT NULL
);
""",
    ),
    # Version 3: bodies in wire form (dot-stuffed, spool/wire.py). Those written before hold the message
    # itself (false): delivered as they were, stuffed on the way.
    (
        3,
        """
ALTER TABLE relay365.messages ADD COLUMN stuffed boolean NOT NULL DEFAULT false;
""",
    ),
)
CURRENT = MIGRATIONS[-1][0]
MIN_SERVER_VERSION = 120000  # PostgreSQL 12 (FOR UPDATE SKIP LOCKED, DROP DATABASE ... FORCE is 13)


def _migrate_hint(url: str) -> str:
    return f"run 'relay365 spool migrate -c relay365.toml' (database {url})"


def schema_version(conn: psycopg.Connection[Any]) -> int | None:
    """The schema version in the database, None when it has no relay365 schema."""
    row = conn.execute("SELECT to_regclass('relay365.schema_version') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return None
    row = conn.execute("SELECT max(version) FROM relay365.schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


async def aschema_version(conn: psycopg.AsyncConnection[Any]) -> int | None:
    cur = await conn.execute("SELECT to_regclass('relay365.schema_version') IS NOT NULL")
    row = await cur.fetchone()
    if not row or not row[0]:
        return None
    cur = await conn.execute("SELECT max(version) FROM relay365.schema_version")
    row = await cur.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def check_version(version: int | None, url: str) -> None:
    """``SpoolSchemaError`` unless ``version`` is the one this build works with."""
    if version is None:
        raise SpoolSchemaError(f"the database has no relay365 spool schema yet: {_migrate_hint(url)}")
    if version < CURRENT:
        raise SpoolSchemaError(
            f"the spool schema is at version {version}, this relay365 needs {CURRENT}: {_migrate_hint(url)}"
        )
    if version > CURRENT:
        raise SpoolSchemaError(
            f"the spool schema is at version {version}, newer than this relay365 knows ({CURRENT}):"
            " upgrade relay365 on this node (another node has migrated the database)"
        )


def check_server(version: int) -> None:
    if version < MIN_SERVER_VERSION:
        raise SpoolSchemaError(
            f"PostgreSQL {version // 10000} is too old for the relay365 spool: use PostgreSQL 12 or newer"
        )


def migrate(conn: psycopg.Connection[Any]) -> tuple[int | None, int]:
    """Create or upgrade the schema in one transaction; returns (version before, version after)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS relay365.schema_version ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now(),"
            " relay365 text NOT NULL)"
        )
        before = schema_version(conn) or None
        have = before or 0
        if have > CURRENT:
            check_version(have, "")
        for version, sql in MIGRATIONS:
            if version <= have:
                continue
            conn.execute(sql.encode())  # several statements: the simple query protocol
            conn.execute(
                "INSERT INTO relay365.schema_version (version, relay365) VALUES (%s, %s)",
                (version, __version__),
            )
    return before, CURRENT


def migrate_url(url: str, *, password: str | None = None) -> tuple[int | None, int]:
    with psycopg.connect(url, password=password, autocommit=True) as conn:
        check_server(conn.info.server_version)
        return migrate(conn)
