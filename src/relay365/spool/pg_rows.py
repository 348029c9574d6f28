"""The PostgreSQL spool's rows: every statement that reads or writes queue entries, claims and outcomes,
as functions on an async connection (the pool, bodies and wake-ups are postgres.py's).

A function whose name says ``_tx`` runs inside the caller's transaction; the others are one statement
(autocommit: a statement is its own transaction). Every value is a parameter; the SQL is fixed text,
except the filter conditions, which ``filters.where_sql`` builds from fixed fragments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from psycopg import AsyncConnection

from relay365.errors import LeaseLost, QueueEntryNotFound
from relay365.spool.filters import PG, where_sql
from relay365.spool.model import (
    FINAL_STATES,
    Envelope,
    PaceEvent,
    QueueEntry,
    QueueFilter,
    QueueOrder,
    QueueStats,
    RcptState,
    Recipient,
    RecipientUpdate,
)

Conn = AsyncConnection[Any]
PACING_HISTORY = 86_400.0  # the longest pacing window: 24 hours (recipients per rolling day)
OPEN_STATES = [RcptState.QUEUED.value, RcptState.DEFERRED.value]
FINAL = [s.value for s in FINAL_STATES]
CHANNEL = "relay365_spool"

# message columns, then recipient columns (one row per recipient, in order)
_MSG = (
    "m.queue_id, m.mail_from, m.device, m.peer, m.listener, m.smtputf8, m.is_dsn, m.size, m.received_at,"
    " m.held, m.lease_owner, m.lease_until, m.subject, m.message_id, m.stuffed"
)
_RCPT = "r.rcpt, r.state, r.attempts, r.next_attempt, r.last_reply, r.transport"
_NEXT_DUE = (
    "(SELECT min(x.next_attempt) FROM relay365.recipients x"
    " WHERE x.queue_id = m.queue_id AND x.state IN ('queued', 'deferred'))"
)


def entries(rows: Iterable[Sequence[Any]]) -> list[QueueEntry]:
    """Queue entries from rows of message columns + recipient columns, grouped in row order."""
    out: list[QueueEntry] = []
    current: Sequence[Any] | None = None
    rcpts: list[Recipient] = []

    def flush() -> None:
        if current is not None:
            out.append(_entry(current, rcpts))

    for row in rows:
        if current is None or row[0] != current[0]:
            flush()
            current, rcpts = row, []
        if row[15] is not None:
            rcpts.append(Recipient(row[15], RcptState(row[16]), row[17], row[18], row[19], row[20]))
    flush()
    return out


def _entry(row: Sequence[Any], recipients: list[Recipient]) -> QueueEntry:
    rcpts = tuple(recipients)
    env = Envelope(
        mail_from=row[1],
        rcpt_tos=tuple(r.rcpt for r in rcpts),
        device=row[2],
        peer=row[3],
        listener=row[4],
        smtputf8=row[5],
        is_dsn=row[6],
        subject=row[12],
        message_id=row[13],
    )
    return QueueEntry(
        row[0],
        env,
        int(row[7]),
        row[8],
        row[9],
        rcpts,
        "",
        claimed_by=row[10],
        claimed_until=row[11],
        stuffed=row[14],
    )


async def read_entry(conn: Conn, queue_id: str) -> QueueEntry:
    cur = await conn.execute(
        f"SELECT {_MSG}, {_RCPT} FROM relay365.messages m"  # noqa: S608
        " LEFT JOIN relay365.recipients r USING (queue_id) WHERE m.queue_id = %s ORDER BY r.pos",
        (queue_id,),
    )
    found = entries(await cur.fetchall())
    if not found:
        raise QueueEntryNotFound(queue_id)
    return found[0]


# -- inserting ---------------------------------------------------------------------------------------
def insert_sql(*, with_body: bool, notify: str | None) -> str:
    """One statement that queues a message: (its body chunk,) the row, its recipients (, a NOTIFY).
    Parameters: queue_id, [body], envelope values ..., rcpts (text[]), now, [payload]."""
    parts = []
    if with_body:
        parts.append(
            "b AS (INSERT INTO relay365.bodies (queue_id, seq, chunk) VALUES (%(q)s, %(seq)s, %(body)b))"
        )
    parts.append(
        "m AS (INSERT INTO relay365.messages (queue_id, mail_from, device, peer, listener, smtputf8, is_dsn,"
        " size, received_at, subject, message_id, stuffed, next_due)"
        " VALUES (%(q)s, %(mail_from)s, %(device)s, %(peer)s, %(listener)s, %(smtputf8)s, %(is_dsn)s,"
        " %(size)s, %(now)s, %(subject)s, %(message_id)s,"
        " %(stuffed)s, CASE WHEN cardinality(%(rcpts)s::text[]) > 0 THEN %(now)s END))"
    )
    parts.append(
        "r AS (INSERT INTO relay365.recipients (queue_id, pos, rcpt, state, next_attempt)"
        " SELECT %(q)s, t.pos - 1, t.rcpt, 'queued', %(now)s"
        " FROM unnest(%(rcpts)s::text[]) WITH ORDINALITY AS t (rcpt, pos))"
    )
    tail = f"SELECT pg_notify('{CHANNEL}', %(payload)s)" if notify else "SELECT 1"
    return "WITH " + ", ".join(parts) + " " + tail


def insert_params(
    queue_id: str, env: Envelope, size: int, now: float, *, stuffed: bool = True
) -> dict[str, Any]:
    """``stuffed``: the body is in wire form (``spool/wire.py``; False only for a copied old entry)."""
    return {
        "stuffed": stuffed,
        "q": queue_id,
        "mail_from": env.mail_from,
        "device": env.device,
        "peer": env.peer,
        "listener": env.listener,
        "smtputf8": env.smtputf8,
        "is_dsn": env.is_dsn,
        "size": size,
        "now": now,
        "subject": env.subject,
        "message_id": env.message_id,
        "rcpts": list(env.rcpt_tos),
    }


# -- claims ------------------------------------------------------------------------------------------
_CLAIM = (
    "WITH c AS (UPDATE relay365.messages m SET lease_owner = %(owner)s, lease_until = %(until)s"  # noqa: S608
    " WHERE m.queue_id IN (SELECT queue_id FROM relay365.messages"
    "  WHERE NOT held AND next_due IS NOT NULL AND next_due <= %(now)s"
    "  AND (lease_owner = '' OR lease_until <= %(now)s)"
    "  ORDER BY next_due, queue_id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
    " RETURNING m.*)"
    f" SELECT {_MSG}, {_RCPT} FROM c m JOIN relay365.recipients r USING (queue_id)"
    " ORDER BY m.next_due, m.queue_id, r.pos"
)


async def claim(conn: Conn, *, owner: str, now: float, limit: int, lease: float) -> list[QueueEntry]:
    """One statement: lock the due messages nobody else is locking (SKIP LOCKED: two nodes claiming at
    once take different messages, never wait for each other), claim them, return them."""
    params = {"owner": owner, "until": now + lease, "now": now, "limit": limit}
    cur = await conn.execute(_CLAIM, params)
    return entries(await cur.fetchall())


async def renew(conn: Conn, ids: Sequence[str], *, owner: str, until: float) -> set[str]:
    cur = await conn.execute(
        "UPDATE relay365.messages SET lease_until = %s WHERE queue_id = ANY(%s) AND lease_owner = %s"
        " RETURNING queue_id",
        (until, list(ids), owner),
    )
    return {row[0] for row in await cur.fetchall()}


async def release(conn: Conn, queue_id: str, *, owner: str) -> bool:
    cur = await conn.execute(
        "UPDATE relay365.messages SET lease_owner = '', lease_until = 0"
        " WHERE queue_id = %s AND lease_owner = %s",
        (queue_id, owner),
    )
    return cur.rowcount > 0


async def next_due_time(conn: Conn) -> float | None:
    cur = await conn.execute(
        "SELECT (SELECT next_due FROM relay365.messages WHERE NOT held AND next_due IS NOT NULL"
        "  AND lease_owner = '' ORDER BY next_due LIMIT 1),"
        " (SELECT min(greatest(next_due, lease_until)) FROM relay365.messages"
        "  WHERE lease_owner <> '' AND NOT held AND next_due IS NOT NULL)"
    )
    row = await cur.fetchone()
    times = [float(t) for t in (row or ()) if t is not None]
    return min(times) if times else None


# -- outcomes ----------------------------------------------------------------------------------------
async def check_claim_tx(conn: Conn, queue_id: str, owner: str) -> None:
    """Inside a transaction: lock the row and check ``owner`` still holds it (``LeaseLost``)."""
    cur = await conn.execute(
        "SELECT lease_owner FROM relay365.messages WHERE queue_id = %s FOR UPDATE", (queue_id,)
    )
    row = await cur.fetchone()
    if row is None or row[0] != owner:
        holder = "deleted" if row is None else f"claimed by {row[0] or 'nobody'}"
        raise LeaseLost(f"{queue_id} is no longer claimed by {owner} ({holder})")


async def apply_outcome_tx(
    conn: Conn,
    queue_id: str,
    updates: Sequence[RecipientUpdate],
    pace_events: Sequence[PaceEvent],
    now: float,
) -> bool:
    """Inside a transaction holding the claim: recipients updated (final states stay final), pacing
    events added, and the entry removed (True) or its claim ended (False)."""
    if updates:
        async with conn.cursor() as cur:
            await cur.executemany(
                "UPDATE relay365.recipients SET state = %s, attempts = attempts + %s, next_attempt = %s,"
                " last_reply = %s, transport = COALESCE(NULLIF(%s, ''), transport)"
                " WHERE queue_id = %s AND rcpt = %s AND state IN ('queued', 'deferred')",
                [
                    (
                        u.state.value,
                        int(u.counts_attempt),
                        u.next_attempt,
                        u.reply[:1000],
                        u.transport,
                        queue_id,
                        u.rcpt,
                    )
                    for u in updates
                ],
            )
    if pace_events:
        await add_pacing_tx(conn, pace_events, now)
    cur = await conn.execute(
        f"UPDATE relay365.messages m SET lease_owner = '', lease_until = 0, next_due = {_NEXT_DUE}"  # noqa: S608
        " WHERE queue_id = %s RETURNING next_due",
        (queue_id,),
    )
    row = await cur.fetchone()
    if row is not None and row[0] is None:  # nothing open: the entry goes
        await delete_tx(conn, queue_id)
        return True
    return False


async def add_pacing_tx(conn: Conn, events: Sequence[PaceEvent], now: float) -> None:
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO relay365.pacing (key, at, recipients) VALUES (%s, %s, %s)",
            [(e.key, e.at, e.recipients) for e in events],
        )
    await conn.execute("DELETE FROM relay365.pacing WHERE at < %s", (now - PACING_HISTORY,))


async def delete_tx(conn: Conn, queue_id: str) -> None:
    cur = await conn.execute("DELETE FROM relay365.messages WHERE queue_id = %s", (queue_id,))
    if cur.rowcount == 0:
        raise QueueEntryNotFound(queue_id)
    await conn.execute("DELETE FROM relay365.bodies WHERE queue_id = %s", (queue_id,))


async def pace_events(conn: Conn, since: float) -> list[PaceEvent]:
    cur = await conn.execute(
        "SELECT key, at, recipients FROM relay365.pacing WHERE at >= %s ORDER BY at", (since,)
    )
    return [PaceEvent(k, a, n) for k, a, n in await cur.fetchall()]


# -- administration ----------------------------------------------------------------------------------
async def stats(conn: Conn) -> QueueStats:
    counts = {state.value: 0 for state in RcptState}
    cur = await conn.execute("SELECT state, count(*) FROM relay365.recipients GROUP BY state")
    for state, n in await cur.fetchall():
        counts[state] = int(n)
    cur = await conn.execute(
        "SELECT (SELECT count(*) FROM relay365.messages WHERE held),"
        " (SELECT min(received_at) FROM relay365.messages WHERE next_due IS NOT NULL)"
    )
    row = await cur.fetchone()
    assert row is not None
    return QueueStats(counts, int(row[0]), row[1])


async def make_due_tx(conn: Conn, where: QueueFilter | None, queue_id: str | None, now: float) -> int:
    """Every open recipient of one message (``queue_id``) or of the matching ones becomes due at
    ``now``; returns how many messages matched (``QueueEntryNotFound`` for an unknown id)."""
    if queue_id is not None:
        cond, params = "m.queue_id = %s", [queue_id]
    else:
        assert where is not None
        cond, params = where_sql(where, now, dialect=PG)
    cur = await conn.execute(
        f"SELECT m.queue_id FROM relay365.messages m WHERE {cond} FOR UPDATE".encode(),  # noqa: S608
        params,
    )
    ids = [row[0] for row in await cur.fetchall()]
    if queue_id is not None and not ids:
        raise QueueEntryNotFound(queue_id)
    if ids:
        await conn.execute(
            "UPDATE relay365.recipients SET next_attempt = %s WHERE queue_id = ANY(%s)"
            " AND state IN ('queued', 'deferred')",
            (now, ids),
        )
        await conn.execute(
            f"UPDATE relay365.messages m SET next_due = {_NEXT_DUE} WHERE queue_id = ANY(%s)",  # noqa: S608
            (ids,),
        )
    return len(ids)


async def set_held(conn: Conn, queue_id: str, held: bool) -> None:
    cur = await conn.execute("UPDATE relay365.messages SET held = %s WHERE queue_id = %s", (held, queue_id))
    if cur.rowcount == 0:
        raise QueueEntryNotFound(queue_id)


async def bump_flush_tx(conn: Conn) -> int:
    cur = await conn.execute(
        "UPDATE relay365.control SET value = value + 1 WHERE key = 'flush_generation' RETURNING value"
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def flush_generation(conn: Conn) -> int:
    cur = await conn.execute("SELECT value FROM relay365.control WHERE key = 'flush_generation'")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def notify(conn: Conn, payload: str) -> None:
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


async def select_page(
    conn: Conn, f: QueueFilter, *, limit: int | None, order: QueueOrder, cursor: str | None, now: float
) -> tuple[int, list[QueueEntry], bool]:
    """Inside a REPEATABLE READ transaction: (how many match, the page, whether more follow)."""
    cond, params = where_sql(f, now, dialect=PG)
    newest = order == "newest"
    page_cond, page_params = cond, list(params)
    if cursor:
        page_cond += " AND m.queue_id < %s" if newest else " AND m.queue_id > %s"
        page_params.append(cursor)
    tail = ""
    if limit is not None:
        tail = " LIMIT %s"
        page_params.append(limit + 1)
    direction = "DESC" if newest else "ASC"
    cur = await conn.execute(
        f"SELECT count(*) FROM relay365.messages m WHERE {cond}".encode(),  # noqa: S608
        params,
    )
    row = await cur.fetchone()
    total = int(row[0]) if row else 0
    cur = await conn.execute(
        f"WITH p AS (SELECT * FROM relay365.messages m WHERE {page_cond}"  # noqa: S608
        f" ORDER BY m.queue_id {direction}{tail})"
        f" SELECT {_MSG}, {_RCPT} FROM p m LEFT JOIN relay365.recipients r USING (queue_id)"
        f" ORDER BY m.queue_id {direction}, r.pos".encode(),
        page_params,
    )
    found = entries(await cur.fetchall())
    more = limit is not None and len(found) > limit
    return total, found[:limit] if limit is not None else found, more
