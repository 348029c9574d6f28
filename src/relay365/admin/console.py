"""The console's state (its dependencies and its guard) and the data every view is built from, shared
by the HTML pages and the JSON API so both always show the same thing."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any

from relay365.admin.auth import Guard
from relay365.admin.ports import ConsoleDeps
from relay365.admin.views import entry_json, event_json, headers_of
from relay365.errors import QueueEntryNotFound
from relay365.observability.tracking import EventKind, TraceQuery
from relay365.tracing.explain import microsoft_half, timeline
from relay365.tracing.model import TraceStatus

AWAITING = "awaiting trace"  # handed to Microsoft 365, its trace not read yet


def _status_name(status: str) -> str:
    """A follower row's status as the console shows it (Exchange's names)."""
    if not status:
        return AWAITING
    if status == "unresolved":
        return "Unresolved"
    return TraceStatus.parse(status).display


@dataclass(kw_only=True)
class Console:
    deps: ConsoleDeps
    guard: Guard
    open_metrics: bool = True
    tls: bool = False

    def explain(self, reply: str) -> str | None:
        try:
            return self.deps.explain(reply)
        except Exception:  # the catalogue is advice: never let it break a page
            return None

    async def overview(self) -> dict[str, Any]:
        d = self.deps
        now = d.status.now()
        # The queue (spool thread) and the tracking log (its reader thread) are read at the same time.
        stats, hour, day, transports = await asyncio.gather(
            d.queue.stats(),
            d.tracking.counts(now - 3600),
            d.tracking.counts(now - 86400),
            d.status.transports(),
        )
        shown = (
            EventKind.RECEIVED,
            EventKind.DELIVERED,
            EventKind.DEFERRED,
            EventKind.BOUNCED,
            EventKind.REFUSED,
        )
        return {
            "now": now,
            "counts": {
                "hour": {k.value: hour.get(k, 0) for k in shown},
                "day": {k.value: day.get(k, 0) for k in shown},
            },
            "queue": {
                "recipients": stats.recipients,
                "held_messages": stats.held,
                "oldest_seconds": round(now - stats.oldest, 1) if stats.oldest is not None else None,
            },
            "listeners": d.status.listeners(),
            "connections": d.status.connections(),
            "transports": [dataclasses.asdict(t) for t in transports],
            "post_acceptance": await self.post_acceptance(now - 86400),
        }

    async def post_acceptance(self, since: float) -> list[dict[str, Any]] | None:
        """Per route (and transport): what Microsoft 365 did with the recipients handed to it since
        ``since``, by message trace status; None when no transport is followed."""
        source = self.deps.post_acceptance
        if source is None:
            return None
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for c in await source.outcomes(since):
            row = rows.setdefault(
                (c.route, c.transport),
                {"route": c.route or "-", "transport": c.transport, "total": 0, "statuses": {}},
            )
            name = _status_name(c.status)
            row["statuses"][name] = row["statuses"].get(name, 0) + c.count
            row["total"] += c.count
        return list(rows.values())

    async def message(self, queue_id: str) -> dict[str, Any]:
        """The queue entry (if still queued) and its whole trace; KeyError if neither exists."""
        d = self.deps
        qid = queue_id.strip().upper()
        entry: dict[str, Any] | None = None
        headers: list[tuple[str, str]] = []
        try:
            e = await d.queue.get(qid)
            entry = entry_json(e, self.explain)
            headers = headers_of(await d.queue.head(qid))
        except QueueEntryNotFound:
            pass
        page = await d.tracking.search(TraceQuery(queue_id=qid, limit=1000))
        ordered = timeline(page.events)  # relay and Microsoft 365 events in the order they happened
        events = [event_json(ev, self.explain) for ev in ordered]
        if entry is None and not events:
            raise KeyError(qid)
        first = next((ev for ev in events if ev["kind"] == "received"), events[0] if events else None)
        routes = {ev["recipient"]: ev for ev in events if ev["kind"] == "routed"}
        bounced = [ev for ev in events if ev["kind"] == "bounced"]
        sender = entry["from"] if entry else (first or {}).get("sender", "")
        return {
            "queue_id": qid,
            "entry": entry,
            "headers": headers,
            "summary": first,
            "events": events,
            "routes": list(routes.values()),
            "dsn_sent_to": sender if bounced and sender else None,
            "microsoft": await self._microsoft(qid, ordered),
        }

    async def _microsoft(self, qid: str, events: list[Any]) -> list[dict[str, Any]]:
        """Per recipient handed to Microsoft 365: its last status in the trace with reason and advice,
        or that relay365 is still waiting for it."""
        half = {row["recipient"]: row for row in microsoft_half(events)}
        source = self.deps.post_acceptance
        for item in await source.for_message(qid) if source is not None else []:
            if item.recipient not in half:
                half[item.recipient] = {
                    "queue_id": qid, "recipient": item.recipient, "transport": item.transport,
                    "status": _status_name(item.status), "at": None, "reason": "", "from_ip": item.from_ip,
                    "advice": None, "advice_source": None, "unresolved": False, "events": [],
                    "next_check": None if item.done else item.due,
                }  # fmt: skip
        return sorted(half.values(), key=lambda row: str(row["recipient"]))
