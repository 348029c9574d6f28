"""Data shown by both the pages and the JSON API: queue entries, trace events, filters read from a
query string (with a clear error for every bad value)."""

from __future__ import annotations

import datetime as dt
import email.parser
import email.policy
from collections.abc import Callable, Mapping
from typing import Any

from relay365.observability.tracking import MAX_PAGE, EventKind, TraceQuery, TrackingEvent
from relay365.spool.model import PAGE_MAX, QueueEntry, QueueFilter, QueueQuery, QueueState
from relay365.tracing.explain import event_dict

Explain = Callable[[str], str | None]


class BadRequest(ValueError):
    """A query parameter with a value the console cannot use; the message names it."""


def _text(q: Mapping[str, str], name: str) -> str | None:
    v = q.get(name, "").strip()
    return v or None


def _int(q: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = q.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise BadRequest(f"{name} must be a whole number from {lo} to {hi}, not {raw!r}")
    return int(raw)


def parse_time(value: str, name: str) -> float:
    """ISO 8601 (``2026-01-31T08:00``, UTC unless an offset is given) or Unix seconds."""
    v = value.strip()
    try:
        return float(v)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(v)
    except ValueError:
        raise BadRequest(
            f"{name} must be a time like 2026-01-31T08:00 (UTC) or Unix seconds, not {v!r}"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


AGES = {"": None, "5m": 300.0, "1h": 3600.0, "4h": 14400.0, "1d": 86400.0, "3d": 259200.0}


def queue_query(q: Mapping[str, str]) -> QueueQuery:
    state = _text(q, "state")
    if state is not None and state not in set(QueueState):
        raise BadRequest(f"state must be one of {', '.join(QueueState)}, not {state!r}")
    age = q.get("min_age", "").strip()
    if age not in AGES and not age.isdigit():
        raise BadRequest(f"min_age must be seconds or one of {', '.join(a for a in AGES if a)}, not {age!r}")
    order = q.get("order", "newest") or "newest"
    if order not in ("newest", "oldest"):
        raise BadRequest(f"order must be newest or oldest, not {order!r}")
    where = QueueFilter(
        state=QueueState(state) if state else None,
        device=_text(q, "device"),
        sender=_text(q, "sender"),
        recipient=_text(q, "recipient"),
        transport=_text(q, "transport"),
        min_age=float(age) if age.isdigit() else AGES[age],
    )
    return QueueQuery(
        where=where,
        order="oldest" if order == "oldest" else "newest",
        cursor=_text(q, "cursor"),
        limit=_int(q, "limit", 50, 1, PAGE_MAX),
    )


def trace_query(q: Mapping[str, str], *, limit_max: int = MAX_PAGE) -> TraceQuery:
    kinds: list[EventKind] = []
    for k in (q.get("kind") or "").split(","):
        if k.strip():
            if k.strip() not in set(EventKind):
                raise BadRequest(f"kind must be among {', '.join(EventKind)}, not {k.strip()!r}")
            kinds.append(EventKind(k.strip()))
    before = _text(q, "before")
    if before is not None and not before.isdigit():
        raise BadRequest(f"before must be an event id, not {before!r}")
    since, until = _text(q, "since"), _text(q, "until")
    return TraceQuery(
        sender=_text(q, "sender"),
        recipient=_text(q, "recipient"),
        subject=_text(q, "subject"),
        message_id=_text(q, "message_id"),
        queue_id=_text(q, "queue_id"),
        device=_text(q, "device"),
        transport=_text(q, "transport"),
        kinds=tuple(kinds),
        since=parse_time(since, "since") if since else None,
        until=parse_time(until, "until") if until else None,
        before=int(before) if before else None,
        limit=_int(q, "limit", 100, 1, limit_max),
    )


def entry_json(e: QueueEntry, explain: Explain) -> dict[str, Any]:
    return {
        "queue_id": e.queue_id,
        "from": e.envelope.mail_from,
        "subject": e.envelope.subject,
        "message_id": e.envelope.message_id,
        "device": e.envelope.device,
        "peer": e.envelope.peer,
        "listener": e.envelope.listener,
        "size": e.size,
        "received_at": e.received_at,
        "held": e.held,
        "recipients": [
            {
                "rcpt": r.rcpt,
                "state": r.state.value,
                "attempts": r.attempts,
                "next_attempt": r.next_attempt,
                "transport": r.transport,
                "last_reply": r.last_reply,
                "explanation": explain(r.last_reply) if r.last_reply else None,
            }
            for r in e.recipients
        ],
    }


def event_json(e: TrackingEvent, explain: Explain) -> dict[str, Any]:
    """The event, the side it comes from (relay / microsoft), for Microsoft's status relay365's advice,
    and for an SMTP reply the catalogue's explanation."""
    data = event_dict(e)
    data["explanation"] = explain(e.reply) if e.reply and e.reply[:1] in "45" else None
    return data


def headers_of(head: bytes) -> list[tuple[str, str]]:
    """The header fields at the start of a message, decoded (RFC 2047) for display."""
    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(head, headersonly=True)
    out = []
    for k, v in msg.items():
        try:
            out.append((k, str(v)))
        except (ValueError, LookupError):
            out.append((k, repr(v)))
    return out


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def age(seconds: float) -> str:
    s = int(max(0, seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
