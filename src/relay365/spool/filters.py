"""A queue filter (``relay365 queue list|retry``, ``/api/queue``, the console's queue page) as an SQL
condition on ``messages m``, so the database selects, counts and pages instead of the caller loading
every entry. Pages are keyset-paged on the queue id, which sorts by arrival, so a page deep in a queue
of 100,000 costs what the first one does.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from relay365.spool.model import QueueFilter, QueueOrder, QueueState, RcptState, Recipient
from relay365.spool.sqlite_schema import MESSAGE_COLUMNS, RECIPIENT_COLUMNS

# The SQL below is put together from fixed fragments only; every value is a parameter.
_OPEN = (RcptState.QUEUED.value, RcptState.DEFERRED.value)


@dataclass(frozen=True, slots=True)
class Dialect:
    """How SQLite and PostgreSQL spell the same condition."""

    mark: str  # a parameter
    like: str  # case-insensitive LIKE (SQLite's LIKE ignores ASCII case; PostgreSQL has ILIKE)
    held: str  # "the message is held"
    true: str  # a condition that always holds
    recipients: str  # the recipients table


SQLITE = Dialect(mark="?", like="LIKE", held="m.held = 1", true="1", recipients="recipients")
PG = Dialect(mark="%s", like="ILIKE", held="m.held", true="true", recipients="relay365.recipients")


def _like(pattern: str) -> str:
    """An address, ``@domain`` or ``*`` pattern as a LIKE pattern (ESCAPE '\\'), SQL wildcards
    taken literally. LIKE ignores ASCII case, as address comparison should (RFC 5321 2.4)."""
    p = pattern.strip()
    if p.startswith("@"):
        p = "*" + p
    p = p.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return p.replace("*", "%")


def where_sql(f: QueueFilter, now: float, *, dialect: Dialect = SQLITE) -> tuple[str, list[Any]]:
    """The SQL condition on ``messages m`` for a filter, with its parameters."""
    d = dialect
    clauses: list[str] = []
    params: list[Any] = []
    if f.device:
        clauses.append(f"m.device = {d.mark}")
        params.append(f.device)
    if f.sender is not None and f.sender.strip():
        if f.sender.strip() == "<>":
            clauses.append("m.mail_from = ''")
        else:
            clauses.append(f"m.mail_from {d.like} {d.mark} ESCAPE '\\'")
            params.append(_like(f.sender))
    if f.min_age is not None:
        clauses.append(f"m.received_at <= {d.mark}")
        params.append(now - f.min_age)
    if f.state is QueueState.HELD:
        clauses.append(d.held)
    per_rcpt: list[str] = []
    if f.state is QueueState.OPEN:
        per_rcpt.append(f"r.state IN ({d.mark},{d.mark})")
        params.extend(_OPEN)
    elif f.state is not None and f.state is not QueueState.HELD:
        per_rcpt.append(f"r.state = {d.mark}")
        params.append(f.state.value)
    if f.recipient is not None and f.recipient.strip():
        per_rcpt.append(f"r.rcpt {d.like} {d.mark} ESCAPE '\\'")
        params.append(_like(f.recipient))
    if f.transport:
        per_rcpt.append(f"r.transport = {d.mark}")
        params.append(f.transport)
    if per_rcpt:
        # Not a correlated EXISTS: SQLite would walk the state index once per message (20,000
        # messages: 36 s). An IN list is built once, from the state index or one scan.
        same_rcpt = " AND ".join(per_rcpt)
        clauses.append(f"m.queue_id IN (SELECT r.queue_id FROM {d.recipients} r WHERE {same_rcpt})")  # noqa: S608
    return " AND ".join(clauses) or d.true, params


def select_page(
    conn: sqlite3.Connection,
    f: QueueFilter,
    *,
    limit: int | None,
    order: QueueOrder,
    cursor: str | None,
    now: float,
) -> tuple[int, list[Any], dict[str, list[Recipient]], bool]:
    """(how many match, the page's message rows, their recipients by queue id, whether more follow),
    from one snapshot."""
    sql, params = where_sql(f, now)
    newest = order == "newest"
    page_sql, page_params = sql, list(params)
    if cursor:
        page_sql += " AND m.queue_id < ?" if newest else " AND m.queue_id > ?"
        page_params.append(cursor)
    tail = " LIMIT ?" if limit is not None else ""
    if limit is not None:
        page_params.append(limit + 1)
    direction = "DESC" if newest else "ASC"
    conn.execute("BEGIN")  # one snapshot for the count and the page
    try:
        total = conn.execute(f"SELECT COUNT(*) FROM messages m WHERE {sql}", params).fetchone()[0]  # noqa: S608
        rows = conn.execute(
            f"SELECT {MESSAGE_COLUMNS} FROM messages m WHERE {page_sql}"  # noqa: S608
            f" ORDER BY m.queue_id {direction}{tail}",
            page_params,
        ).fetchall()
        more = limit is not None and len(rows) > limit
        rows = rows[:limit] if limit is not None else rows
        rcpts: dict[str, list[Recipient]] = {}
        ids = [r[0] for r in rows]
        for start in range(0, len(ids), 500):  # SQLite's limit on parameters per statement
            part = ids[start : start + 500]
            marks = ",".join("?" * len(part))
            for qid, *r in conn.execute(
                f"SELECT queue_id, {RECIPIENT_COLUMNS} FROM recipients"  # noqa: S608
                f" WHERE queue_id IN ({marks}) ORDER BY queue_id, pos",
                part,
            ):
                got = Recipient(r[0], RcptState(r[1]), r[2], r[3], r[4], r[5])
                rcpts.setdefault(qid, []).append(got)
    finally:
        conn.execute("COMMIT")
    return int(total), rows, rcpts, more


def make_due(conn: sqlite3.Connection, f: QueueFilter, now: float) -> int:
    """Inside the caller's write transaction: every open recipient of the matching messages becomes
    due at ``now``; returns how many messages matched."""
    sql, params = where_sql(f, now)
    count = conn.execute(f"SELECT COUNT(*) FROM messages m WHERE {sql}", params).fetchone()[0]  # noqa: S608
    conn.execute(
        "UPDATE recipients SET next_attempt=? WHERE state IN (?,?)"  # noqa: S608
        f" AND queue_id IN (SELECT m.queue_id FROM messages m WHERE {sql})",
        (now, *_OPEN, *params),
    )
    return int(count)
