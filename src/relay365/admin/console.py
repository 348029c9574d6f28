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
        }

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
        events = [event_json(ev, self.explain) for ev in reversed(page.events)]
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
        }
