"""One pass of questions to one tenant's trace for a batch of followed recipients.

The cost is the number of requests (100 per 5 minutes per tenant, list and details together: "All calls
to message trace or message trace detail share the same quota", Exchange Team blog, Jan 2026;
learn.microsoft.com/graph/api/messagetracingroot-list-messagetraces), so:

- recipients whose final status is already known and whose events are due are asked with one
  getDetailsByRecipient each, without listing them again;
- the others are found with :meth:`MessageTraceClient.lookup` (time windows, ``messageId`` queries only
  for a few messages; :mod:`.plan`), per envelope sender when there are only a few of them (a window
  narrowed by ``senderAddress`` holds only relay365's mail, however busy the tenant is); when the
  window cannot be narrowed (Graph, many senders) it would hold all the tenant's mail, so it is cut
  per hour of handoff: a pass asks mostly about the last poll interval, one short window;
- a message that had no Message-ID (Exchange then makes one up; Graph's JSON sendMail always does)
  is found in a window narrowed by recipient, by its subject and the time nearest its handoff;
- events are read for at most ``details`` recipients a pass (:class:`DetailBudget`): the rest keep
  their status and are read on the next passes, so one pass never waits long for the quota.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from relay365.tracing.decide import Found, details_record
from relay365.tracing.graph_trace import MessageTraceClient, needs_details
from relay365.tracing.model import TraceRecord, TraceRequest
from relay365.tracing.plan import LAG, LEAD, MAX_AGE, plan
from relay365.tracing.work import FollowItem

SENDER_GROUPS = 3  # up to this many envelope senders in a batch: one narrowed lookup each
BUCKET = 3600.0  # unnarrowed windows: one per hour of handoff

Key = tuple[str, str]


class DetailBudget:
    """How many getDetailsByRecipient requests this pass may still make."""

    def __init__(self, allowed: int) -> None:
        self.left = allowed

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def _hours(items: Sequence[FollowItem]) -> list[list[FollowItem]]:
    """The items grouped by the hour of their handoff, oldest first."""
    groups: dict[int, list[FollowItem]] = {}
    for i in sorted(items, key=lambda i: i.sent_at):
        groups.setdefault(int(i.sent_at // BUCKET), []).append(i)
    return list(groups.values())


def _norm(subject: str) -> str:
    return " ".join(subject.split()).casefold()


def match_without_id(items: Sequence[FollowItem], records: Sequence[TraceRecord]) -> dict[Key, TraceRecord]:
    """Each item's record by recipient and subject, the one received nearest its handoff (within the
    planner's lead and lag); a record matches one item at most."""
    used: set[int] = set()
    out: dict[Key, TraceRecord] = {}
    for item in sorted(items, key=lambda i: i.sent_at):
        candidates = [
            (abs(r.received_at - item.sent_at), n, r)
            for n, r in enumerate(records)
            if n not in used
            and r.recipient.lower() == item.recipient
            and (not item.subject or _norm(r.subject) == _norm(item.subject))
            and item.sent_at - LEAD <= r.received_at <= item.sent_at + LAG
        ]
        if candidates:
            _, n, record = min(candidates, key=lambda c: (c[0], c[1]))
            used.add(n)
            out[item.key] = record
    return out


async def ask(
    client: MessageTraceClient,
    items: Sequence[FollowItem],
    *,
    now: float,
    budget: DetailBudget,
    sender_of: Callable[[FollowItem], str | None],
    keeps_id: Callable[[FollowItem], bool] = lambda item: True,
) -> dict[Key, Found]:
    """What the trace says of ``items`` now; an item missing from the answer was not asked (its events
    are due and this pass's budget is spent). ``keeps_id``: whether Microsoft kept the message's own
    Message-ID (Graph's JSON sendMail makes a new one). Raises the client's ``TraceError`` family."""
    out: dict[Key, Found] = {}
    for item in (i for i in items if i.details_due and i.trace_id):
        if not budget.take():
            continue
        record = details_record(item)
        out[item.key] = Found(record, tuple(await client.details(record)), details_read=True)
    rest = [i for i in items if not (i.details_due and i.trace_id)]
    with_id = [i for i in rest if i.message_id and keeps_id(i)]
    without = [i for i in rest if not (i.message_id and keeps_id(i))]
    if with_id:
        out.update(await _by_message_id(client, with_id, budget=budget, sender_of=sender_of))
    if without:
        out.update(await _by_subject(client, without, now=now, budget=budget))
    return out


async def _by_message_id(
    client: MessageTraceClient,
    items: Sequence[FollowItem],
    *,
    budget: DetailBudget,
    sender_of: Callable[[FollowItem], str | None],
) -> dict[Key, Found]:
    senders = [sender_of(i) for i in items]
    distinct = set(senders)
    groups: list[list[TraceRequest]]
    if None in distinct or len(distinct) > SENDER_GROUPS:
        groups = [
            [TraceRequest(i.message_id, i.recipient, i.sent_at) for i in hour] for hour in _hours(items)
        ]
    else:
        by_sender: dict[str | None, list[TraceRequest]] = {}
        for i, s in zip(items, senders, strict=True):
            by_sender.setdefault(s, []).append(TraceRequest(i.message_id, i.recipient, i.sent_at, sender=s))
        groups = list(by_sender.values())
    read: set[Key] = set()  # the records whose events the client was allowed to read

    def wanted(record: TraceRecord) -> bool:
        if needs_details(record) and budget.take():
            read.add(record.key)
            return True
        return False

    results = {}
    for requests in groups:
        for r in await client.lookup(requests, want_details=wanted):
            results[r.request.key] = r
    out: dict[Key, Found] = {}
    for i in items:
        res = results[TraceRequest(i.message_id, i.recipient, i.sent_at).key]
        rec = res.record
        done = rec is not None and (rec.key in read or not needs_details(rec))
        out[i.key] = Found(rec, res.details, details_read=done, expired=res.expired)
    return out


async def _by_subject(
    client: MessageTraceClient, items: Sequence[FollowItem], *, now: float, budget: DetailBudget
) -> dict[Key, Found]:
    records: list[TraceRecord] = []
    for hour in _hours(items):
        requests = [TraceRequest("", i.recipient, i.sent_at) for i in hour]
        for q in plan(requests, now=now, per_message_limit=0).queries:
            records += await client.traces(q)
    matched = match_without_id(items, records)
    out: dict[Key, Found] = {}
    for i in items:
        record = matched.get(i.key)
        expired = i.sent_at + LAG < now - MAX_AGE
        if record is None:
            out[i.key] = Found(None, expired=expired)
        elif needs_details(record) and budget.take():
            out[i.key] = Found(record, tuple(await client.details(record)), details_read=True)
        else:
            out[i.key] = Found(record, details_read=not needs_details(record))
    return out
