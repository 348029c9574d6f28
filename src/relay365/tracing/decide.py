"""What one answer from Microsoft's trace changes for one followed recipient (pure; no I/O, no clock).

:func:`settle` takes the row, what the trace said of it this pass (:class:`Found`) and the time, and
returns the row to write back plus the tracking events to record once it is written:

- not in the trace yet: ask again after ``poll`` seconds (Microsoft's trace lags behind its 250);
- ``gettingStatus`` / ``pending``: the same; ``pending`` ("delivery is underway or was deferred and
  is being retried", Get-MessageTraceV2) is recorded once, when it first appears;
- a final status (delivered, failed, quarantined, filteredAsSpam, expanded; Graph's
  exchangeMessageTraceStatus) whose events are worth a request but were not read this pass (the
  request budget of the pass was spent): keep the status, read the events on a later pass;
- a final status with its events (or delivered, which needs none): the events, then the status with
  Microsoft's reason, and the row is done;
- past ``horizon`` after the handoff without a final status (or no longer in the 90 days the trace
  keeps): one ``m365_unresolved`` event, and the row is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from relay365.observability.tracking import EventKind, TrackingEvent
from relay365.tracing.explain import describe, reason
from relay365.tracing.graph_trace import needs_details
from relay365.tracing.model import TraceDetail, TraceRecord, TraceStatus
from relay365.tracing.work import FollowItem

UNRESOLVED = "unresolved"  # the row's status once the horizon passed without a final status


@dataclass(frozen=True, slots=True)
class Found:
    """What this pass learnt of one recipient: its record (None: not in the trace), the record's events
    when they were read (``details_read``), and ``expired``: older than the trace keeps."""

    record: TraceRecord | None
    details: tuple[TraceDetail, ...] = ()
    details_read: bool = False
    expired: bool = False


@dataclass(frozen=True, slots=True)
class Settled:
    item: FollowItem
    events: list[TrackingEvent] = field(default_factory=list)
    outcome: str | None = None  # the final status, as Exchange names it, for the outcome counter
    unresolved: bool = False


def _event(item: FollowItem, kind: EventKind, at: float, reply: str, detail: str, ip: str) -> TrackingEvent:
    return TrackingEvent(
        kind=kind,
        at=at,
        queue_id=item.queue_id,
        message_id=item.message_id,
        subject=item.subject,
        sender=item.sender,
        recipient=item.recipient,
        device=item.device,
        peer=ip,
        transport=item.transport,
        reply=reply,
        detail=detail,
    )


def unresolved(item: FollowItem, now: float, horizon: float, why: str) -> Settled:
    last = TraceStatus.parse(item.status).display if item.status else "NotInTrace"
    hours = horizon / 3600
    text = f"{why} within {hours:g} h of the handoff; relay365 stopped asking ([tracing] horizon)"
    event = _event(item, EventKind.M365_UNRESOLVED, now, last, text, item.from_ip)
    return Settled(item.but(done=True, details_due=False, status=UNRESOLVED), [event], unresolved=True)


def later(item: FollowItem, *, due: float, now: float, horizon: float, why: str, quiet: bool) -> Settled:
    """Microsoft was not asked about ``item`` this pass (no permission, no answer): ask at ``due``,
    unless the horizon has passed; then the row is done, with an ``m365_unresolved`` event saying
    ``why`` unless ``quiet`` (a missing permission is said once in the log, not once per message)."""
    if now < item.sent_at + horizon:
        return Settled(item.but(due=due))
    if quiet:
        return Settled(item.but(done=True, details_due=False, status=UNRESOLVED))
    return unresolved(item, now, horizon, why)


def settle(item: FollowItem, found: Found, *, now: float, poll: float, horizon: float) -> Settled:
    asked = item.but(checks=item.checks + 1)
    record = found.record
    past = now >= item.sent_at + horizon
    if record is None:
        if found.expired or past:
            why = "no record of it in Microsoft's message trace"
            return unresolved(asked, now, horizon, why)
        return Settled(asked.but(due=now + poll))
    status = record.status
    seen = asked.but(
        trace_id=record.trace_id,
        received_at=record.received_at,
        from_ip=record.from_ip or asked.from_ip,
    )
    if status.final:
        if needs_details(record) and not found.details_read:
            return Settled(seen.but(status=status.value, details_due=True, due=now))
        return _final(seen, record, found.details)
    if past:
        return unresolved(seen.but(status=status.value), now, horizon, f"still {status.display}")
    events = []
    if status is TraceStatus.PENDING and item.status != status.value:
        text = "Microsoft 365 is still delivering it (deferred and being retried)."
        events.append(_event(seen, EventKind.M365_STATUS, now, status.display, text, seen.from_ip))
        seen = seen.but(status=status.value)
    return Settled(seen.but(due=now + poll), events)


def _final(item: FollowItem, record: TraceRecord, details: Sequence[TraceDetail]) -> Settled:
    status = record.status
    events = [
        _event(item, EventKind.M365_EVENT, d.at or record.received_at, d.event, describe(d), item.from_ip)
        for d in details
    ]
    at = max([record.received_at, *(d.at for d in details)])
    why = reason(details)
    events.append(_event(item, EventKind.M365_STATUS, at, status.display, why, item.from_ip))
    done = item.but(status=status.value, done=True, details_due=False)
    return Settled(done, events, outcome=status.display)


def details_record(item: FollowItem) -> TraceRecord:
    """The record of a row whose final status is known, to read its events (getDetailsByRecipient)."""
    return TraceRecord(
        trace_id=item.trace_id,
        message_id=item.message_id,
        sender=item.sender,
        recipient=item.recipient,
        received_at=item.received_at,
        subject=item.subject,
        size=0,
        from_ip=item.from_ip,
        to_ip="",
        status=TraceStatus.parse(item.status),
    )
