"""Hold, release, retry and delete: for one message, a selection, or every message a filter matches.
Each message acted on is one audit event (who, what, which message) in the tracking log."""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from relay365.admin.ports import QueueAdmin
from relay365.errors import QueueEntryNotFound
from relay365.observability.tracking import EventKind, TrackingEvent, TrackingLog
from relay365.spool.model import QueueEntry, QueueQuery

log = logging.getLogger(__name__)
MAX_BULK = 100_000  # messages one filter action may touch (the whole queue of a busy site)


class Action(enum.StrEnum):
    HOLD = "hold"
    RELEASE = "release"
    RETRY = "retry"
    DELETE = "delete"


_EVENTS = {
    Action.HOLD: EventKind.HELD,
    Action.RELEASE: EventKind.RELEASED,
    Action.RETRY: EventKind.RETRIED,
    Action.DELETE: EventKind.DELETED,
}


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


async def _one(queue: QueueAdmin, action: Action, queue_id: str) -> QueueEntry:
    entry = await queue.get(queue_id)
    if action is Action.HOLD:
        await queue.hold(queue_id, True)
    elif action is Action.RELEASE:
        await queue.hold(queue_id, False)
    elif action is Action.RETRY:
        await queue.retry(queue_id)
    else:
        await queue.delete(queue_id)
    return entry


async def act(
    queue: QueueAdmin,
    tracking: TrackingLog,
    *,
    action: Action,
    ids: Sequence[str],
    actor: str,
    address: str,
    now: float,
) -> Outcome:
    out = Outcome()
    for queue_id in dict.fromkeys(i.strip().upper() for i in ids if i.strip()):
        try:
            entry = await _one(queue, action, queue_id)
        except QueueEntryNotFound:
            out.missing.append(queue_id)
            continue
        out.done.append(queue_id)
        env = entry.envelope
        for rcpt in env.rcpt_tos or ("",):
            tracking.record(
                TrackingEvent(
                    kind=_EVENTS[action],
                    at=now,
                    queue_id=queue_id,
                    message_id=env.message_id,
                    subject=env.subject,
                    sender=env.mail_from,
                    recipient=rcpt,
                    device=env.device,
                    actor=actor,
                    peer=address,
                    detail=f"{action.value} by {actor} from {address}",
                )
            )
    if out.done:
        log.info("console: %s %d message(s) user=%s peer=%s", action.value, len(out.done), actor, address)
    return out


async def matching_ids(queue: QueueAdmin, query: QueueQuery) -> list[str]:
    """Every queue id the filter matches (page by page, at most MAX_BULK)."""
    ids: list[str] = []
    q = replace(query, limit=500, cursor=None)
    while len(ids) < MAX_BULK:
        page = await queue.browse(q)
        ids += [e.queue_id for e in page.entries]
        if page.next_cursor is None:
            break
        q = replace(q, cursor=page.next_cursor)
    return ids[:MAX_BULK]
