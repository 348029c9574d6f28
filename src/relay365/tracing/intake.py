"""The follower's intake: ``delivered`` events of followed transports, read from the tracking log.

The tracking log is where every relay process writes its deliveries, so reading it (rather than
hooking the scheduler) makes the follower independent of which process delivered and needs nothing
of delivery. Each pass reads the events since the stored cursor, less :data:`MARGIN` (events are
written in batches, a little after their time, and relays sharing a log have clocks a little apart),
and adds one row per delivered recipient; a row that exists is left alone (``FollowStore.add`` is
idempotent), so reading an event twice, or by two processes, makes one row.

The route of a recipient comes from the ``routed`` event of the same attempt (its detail starts with
the route's name): the scheduler writes it before the attempt, so it sits just before the delivery.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from relay365.observability.tracking import EventKind, TraceQuery, TrackingEvent, TrackingLog
from relay365.tracing.work import FollowItem, FollowStore

MARGIN = 300.0  # seconds re-read before the cursor
PAGE = 1000  # the tracking log's largest page


async def read_since(tracking: TrackingLog, since: float) -> list[TrackingEvent]:
    """``routed`` and ``delivered`` events since ``since``, oldest first."""
    query = TraceQuery(kinds=(EventKind.ROUTED, EventKind.DELIVERED), since=since, limit=PAGE)
    events: list[TrackingEvent] = []
    while True:
        page = await tracking.search(query)
        events += page.events
        if page.next_cursor is None:
            break
        query = replace(query, before=page.next_cursor)
    events.reverse()
    return events


def items_from(
    events: list[TrackingEvent], *, followed: Mapping[str, object], first_check: float
) -> list[FollowItem]:
    """One row per delivered recipient of a followed transport, due ``first_check`` after delivery."""
    routes: dict[tuple[str, str], str] = {}
    items: list[FollowItem] = []
    for e in events:
        key = (e.queue_id, e.recipient.lower())
        if e.kind is EventKind.ROUTED:
            routes[key] = e.detail.split(": ", 1)[0]
            continue
        if e.transport not in followed or not e.queue_id or not e.recipient:
            continue
        items.append(
            FollowItem(
                queue_id=e.queue_id,
                recipient=e.recipient.lower(),
                message_id=e.message_id.strip().strip("<>"),
                sender=e.sender,
                subject=e.subject,
                device=e.device,
                transport=e.transport,
                route=routes.get(key, ""),
                sent_at=e.at,
                due=e.at + first_check,
            )
        )
    return items


async def take_in(
    tracking: TrackingLog,
    store: FollowStore,
    *,
    followed: Mapping[str, object],
    now: float,
    horizon: float,
    first_check: float,
) -> int:
    """Add the rows for deliveries since the cursor (the last ``horizon`` on the first run); return
    how many were new."""
    cursor = await store.cursor()
    since = max(now - horizon, (cursor if cursor is not None else now - horizon) - MARGIN)
    events = await read_since(tracking, since)
    new = await store.add(items_from(events, followed=followed, first_check=first_check))
    newest = max((e.at for e in events), default=cursor if cursor is not None else since)
    if cursor is None or newest > cursor:
        await store.set_cursor(newest)
    return new
