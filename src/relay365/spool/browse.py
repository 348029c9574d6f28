"""The console's view of the SQLite queue: filtered, counted and paged in SQL (keyset paging on the
queue id, which sorts by arrival), so a page costs the same at 100 or 100,000 queued messages.

Also the schema additions the console needs, applied to older queue databases at open: the Subject and
Message-ID read at DATA time, and the transport of each recipient's last attempt.
"""

from __future__ import annotations

import enum
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from relay365.spool.model import Envelope, QueueEntry, RcptState, Recipient

PAGE_MAX = 500
_OPEN = (RcptState.QUEUED.value, RcptState.DEFERRED.value)
_ADDED = (
    ("messages", "subject", "TEXT NOT NULL DEFAULT ''"),
    ("messages", "message_id", "TEXT NOT NULL DEFAULT ''"),
    ("recipients", "transport", "TEXT NOT NULL DEFAULT ''"),
)


def migrate(conn: sqlite3.Connection) -> None:
    """Add the columns a queue database made by an older relay365 lacks (ALTER TABLE ADD COLUMN
    with a default is instant in SQLite: https://www.sqlite.org/lang_altertable.html)."""
    for table, column, decl in _ADDED:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")


class ViewState(enum.StrEnum):
    """A message with a recipient in that state, or (``held``) a message on hold, or (``open``)
    one with any recipient still to deliver."""

    OPEN = "open"
    QUEUED = "queued"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    HELD = "held"


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueQuery:
    """Every condition given must hold. ``sender``/``recipient``: an address, ``@domain`` or a
    ``*`` pattern (case-insensitive, RFC 5321 2.4); ``<>`` is the null sender. ``min_age``: received
    at least that many seconds ago. ``cursor``: the last queue id of the previous page."""

    state: ViewState | None = None
    device: str | None = None
    sender: str | None = None
    recipient: str | None = None
    transport: str | None = None
    min_age: float | None = None
    order: Literal["newest", "oldest"] = "newest"
    cursor: str | None = None
    limit: int = 50


@dataclass(frozen=True, slots=True)
class QueuePage:
    entries: list[QueueEntry]
    total: int  # how many match, all pages together
    next_cursor: str | None


def _like(pattern: str) -> str:
    p = pattern.strip()
    if p.startswith("@"):
        p = "*" + p
    p = p.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return p.replace("*", "%")


def where_sql(q: QueueQuery, now: float) -> tuple[str, list[Any]]:
    """The condition on ``messages m``, from fixed fragments; every value is a ``?`` parameter."""
    clauses: list[str] = []
    params: list[Any] = []
    if q.device:
        clauses.append("m.device = ?")
        params.append(q.device)
    if q.sender is not None and q.sender.strip():
        if q.sender.strip() == "<>":
            clauses.append("m.mail_from = ''")
        else:
            clauses.append("m.mail_from LIKE ? ESCAPE '\\'")
            params.append(_like(q.sender))
    if q.min_age is not None:
        clauses.append("m.received_at <= ?")
        params.append(now - q.min_age)
    if q.state is ViewState.HELD:
        clauses.append("m.held = 1")
    rcpt: list[str] = []
    if q.state is ViewState.OPEN:
        rcpt.append("r.state IN (?,?)")
        params.extend(_OPEN)
    elif q.state is not None and q.state is not ViewState.HELD:
        rcpt.append("r.state = ?")
        params.append(q.state.value)
    if q.recipient is not None and q.recipient.strip():
        rcpt.append("r.rcpt LIKE ? ESCAPE '\\'")
        params.append(_like(q.recipient))
    if q.transport:
        rcpt.append("r.transport = ?")
        params.append(q.transport)
    if rcpt:
        # The state index (recipients_due) answers "r.state = ?" without visiting every message.
        same_rcpt = " AND ".join(rcpt)
        clauses.append(f"m.queue_id IN (SELECT r.queue_id FROM recipients r WHERE {same_rcpt})")  # noqa: S608
    return " AND ".join(clauses) or "1", params


def select(conn: sqlite3.Connection, q: QueueQuery, now: float, messages_dir: Path) -> QueuePage:
    limit = max(1, min(q.limit, PAGE_MAX))
    sql, params = where_sql(q, now)
    newest = q.order == "newest"
    page_sql, page_params = sql, list(params)
    if q.cursor:
        page_sql += " AND m.queue_id < ?" if newest else " AND m.queue_id > ?"
        page_params.append(q.cursor)
    order = "DESC" if newest else "ASC"
    conn.execute("BEGIN")  # one snapshot for the count and the page
    try:
        total = int(conn.execute(f"SELECT COUNT(*) FROM messages m WHERE {sql}", params).fetchone()[0])  # noqa: S608
        page = (
            "SELECT m.queue_id, m.mail_from, m.device, m.peer, m.listener, m.smtputf8, m.is_dsn, m.size,"  # noqa: S608
            f" m.received_at, m.held, m.subject, m.message_id FROM messages m WHERE {page_sql}"
            f" ORDER BY m.queue_id {order} LIMIT ?"
        )
        rows = conn.execute(page, [*page_params, limit + 1]).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        rcpts: dict[str, list[Recipient]] = {}
        ids = [r[0] for r in rows]
        if ids:
            marks = ",".join("?" * len(ids))
            for qid, *rest in conn.execute(
                "SELECT queue_id, rcpt, state, attempts, next_attempt, last_reply, transport"  # noqa: S608
                f" FROM recipients WHERE queue_id IN ({marks}) ORDER BY queue_id, pos",
                ids,
            ):
                rcpt, state, attempts, nxt, reply, transport = rest
                rcpts.setdefault(qid, []).append(
                    Recipient(rcpt, RcptState(state), attempts, nxt, reply, transport)
                )
    finally:
        conn.execute("COMMIT")
    entries = [_entry(row, rcpts.get(row[0], []), messages_dir) for row in rows]
    return QueuePage(entries, total, entries[-1].queue_id if more and entries else None)


def _entry(row: Any, rcpts: list[Recipient], messages_dir: Path) -> QueueEntry:
    env = Envelope(
        mail_from=row[1],
        rcpt_tos=tuple(r.rcpt for r in rcpts),
        device=row[2],
        peer=row[3],
        listener=row[4],
        smtputf8=bool(row[5]),
        is_dsn=bool(row[6]),
        subject=row[10],
        message_id=row[11],
    )
    return QueueEntry(row[0], env, row[7], row[8], bool(row[9]), messages_dir / row[0], tuple(rcpts))
