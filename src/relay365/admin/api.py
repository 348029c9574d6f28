"""The JSON REST API: everything the pages show and do. ``/api/health`` is open; ``/metrics`` is open
to loopback clients unless ``[admin] open_metrics = false``; everything else needs a session or an
API token (``Authorization: Bearer r365_...``), and changes need the operator role (and, with a
session, the CSRF token). The OpenAPI document is ``/api/openapi.json`` (``relay365.admin.openapi``)."""

from __future__ import annotations

import csv
import dataclasses
import io
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from relay365.admin.actions import MAX_BULK, Action, act, matching_ids
from relay365.admin.auth import Caller
from relay365.admin.console import Console
from relay365.admin.forms import FormError
from relay365.admin.openapi import document
from relay365.admin.ports import CheckRow, MailboxMessage
from relay365.admin.views import BadRequest, entry_json, event_json, queue_query, trace_query, when
from relay365.errors import QueueEntryNotFound, SpoolError
from relay365.observability.tracking import TraceQuery

log = logging.getLogger(__name__)
CSV_LIMIT = 100_000
Handler = Callable[[Request], Awaitable[Response]]


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def error(status: int, text: str) -> JSONResponse:
    return JSONResponse({"error": text}, status_code=status)


def api_routes(c: Console) -> list[Route]:
    d = c.deps

    async def caller(request: Request, *, operator: bool = False) -> Caller:
        return await c.guard.require(request, operator=operator)

    async def health(request: Request) -> Response:
        try:
            stats = await d.queue.stats()
        except SpoolError as e:
            return JSONResponse({"status": "error", "error": f"spool unavailable: {e}"}, status_code=503)
        now = d.status.now()
        held = {
            t.name: round((t.held_until or now) - now, 1) for t in await d.status.transports() if t.held_until
        }
        stopped = d.status.delivery_stopped()
        return JSONResponse(
            {
                # degraded: mail is accepted (within the spool's reserve) but not delivered
                "status": "ok" if stopped is None else "degraded",
                "delivery": {"stopped": stopped is not None, "reason": stopped},
                "listeners": d.status.listeners(),
                "queue": {
                    "recipients": stats.recipients,
                    "held_messages": stats.held,
                    "oldest_seconds": round(now - stats.oldest, 1) if stats.oldest is not None else None,
                },
                "connections": d.status.connections(),
                "suspended_transports": held,
            },
            status_code=200 if stopped is None else 503,
        )

    async def metrics(request: Request) -> Response:
        if not (c.open_metrics and is_loopback(client_address(request))):
            await caller(request)
        try:
            body = await d.status.metrics()
        except SpoolError as e:
            log.error("metrics: cannot read the spool: %s", e)
            return Response(f"spool unavailable: {e}\n", status_code=503, media_type="text/plain")
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def overview(request: Request) -> Response:
        await caller(request)
        return JSONResponse(await c.overview())

    async def queue(request: Request) -> Response:
        await caller(request)
        page = await d.queue.browse(queue_query(request.query_params))
        return JSONResponse(
            {
                "total": page.total,
                "next_cursor": page.next_cursor,
                "messages": [entry_json(e, c.explain) for e in page.entries],
            }
        )

    async def message(request: Request) -> Response:
        await caller(request)
        try:
            return JSONResponse(await c.message(request.path_params["queue_id"]))
        except KeyError:
            return error(404, f"no message {request.path_params['queue_id']!r} in the queue or the trace")

    async def raw(request: Request) -> Response:
        who = await caller(request, operator=True)
        qid = request.path_params["queue_id"].upper()
        try:
            await d.queue.get(qid)
        except QueueEntryNotFound:
            return error(404, f"no message {qid!r} in the queue")
        c.guard.audit(who.principal.name, f"downloaded message {qid}", address=client_address(request))
        return StreamingResponse(
            d.queue.raw(qid),
            media_type="message/rfc822",
            headers={"content-disposition": f'attachment; filename="{qid}.eml"'},
        )

    async def one_action(request: Request) -> Response:
        who = await caller(request, operator=True)
        name = request.path_params["action"]
        if name not in set(Action):
            return error(404, f"no action {name!r}; use one of {', '.join(Action)}")
        out = await act(
            d.queue,
            d.tracking,
            action=Action(name),
            ids=[request.path_params["queue_id"]],
            actor=who.principal.name,
            address=client_address(request),
            now=d.status.now(),
        )
        if out.missing:
            return error(404, f"no message {out.missing[0]!r} in the queue")
        return JSONResponse({"action": name, "done": out.done})

    async def bulk_action(request: Request) -> Response:
        """``{"action": "retry", "ids": [...]}`` or ``{"action": "retry", "filter": {"state": ...}}``."""
        who = await caller(request, operator=True)
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the body must be JSON: {action, ids} or {action, filter}")
        if not isinstance(body, dict) or body.get("action") not in set(Action):
            return error(400, f"action must be one of {', '.join(Action)}")
        ids = body.get("ids")
        flt = body.get("filter")
        if (ids is None) == (flt is None):
            return error(400, "give either ids (a list of queue ids) or filter (queue filters)")
        if ids is not None:
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or len(ids) > MAX_BULK:
                return error(400, f"ids must be a list of at most {MAX_BULK} queue ids")
            targets = ids
        else:
            if not isinstance(flt, dict) or not flt:
                return error(400, "filter must be a non-empty object of queue filters (state, device, ...)")
            targets = await matching_ids(d.queue, queue_query({k: str(v) for k, v in flt.items()}))
        out = await act(
            d.queue,
            d.tracking,
            action=Action(body["action"]),
            ids=targets,
            actor=who.principal.name,
            address=client_address(request),
            now=d.status.now(),
        )
        return JSONResponse({"action": body["action"], "done": out.done, "missing": out.missing})

    async def trace(request: Request) -> Response:
        await caller(request)
        page = await d.tracking.search(trace_query(request.query_params))
        return JSONResponse(
            {"events": [event_json(e, c.explain) for e in page.events], "next_cursor": page.next_cursor}
        )

    async def trace_csv(request: Request) -> Response:
        await caller(request)
        q = trace_query(request.query_params, limit_max=CSV_LIMIT)
        return StreamingResponse(
            csv_rows(c, q),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": 'attachment; filename="relay365-trace.csv"'},
        )

    async def devices(request: Request) -> Response:
        await caller(request)
        return JSONResponse({"devices": [dataclasses.asdict(x) for x in d.devices.devices()]})

    async def spf(request: Request) -> Response:
        await caller(request)
        advice = d.setup.spf() if d.setup else []
        return JSONResponse(
            {"spf": [{"domain": a.domain, "record": a.record, "note": a.note} for a in advice]}
        )

    async def doctor(request: Request) -> Response:
        who = await caller(request, operator=True)
        if d.setup is None:
            return error(404, "the doctor is not available in this process")
        c.guard.audit(who.principal.name, "ran the doctor", address=client_address(request))
        rows = await d.setup.doctor()
        return JSONResponse({"checks": [_row(r) for r in rows]})

    async def mailboxes(request: Request) -> Response:
        await caller(request)
        if d.mailboxes is None:
            return error(404, "no sandbox runs in this process")
        q = request.query_params
        msgs = d.mailboxes.messages(q.get("mailbox") or None, q.get("folder") or None)
        return JSONResponse(
            {
                "mailboxes": d.mailboxes.mailboxes(),
                "messages": [_mail(m) for m in msgs],
            }
        )

    async def openapi(request: Request) -> Response:
        return JSONResponse(document())

    def guarded(fn: Handler) -> Handler:
        async def run(request: Request) -> Response:
            try:
                return await fn(request)
            except (BadRequest, FormError) as e:
                return error(400, str(e))
            except SpoolError as e:
                return error(503, f"spool unavailable: {e}")

        return run

    routes: list[tuple[str, Handler, list[str]]] = [
        ("/api/health", health, ["GET"]),
        ("/metrics", metrics, ["GET"]),
        ("/api/overview", overview, ["GET"]),
        ("/api/queue", queue, ["GET"]),
        ("/api/queue/actions", bulk_action, ["POST"]),
        ("/api/queue/{queue_id}", message, ["GET"]),
        ("/api/queue/{queue_id}/raw", raw, ["GET"]),
        ("/api/queue/{queue_id}/{action}", one_action, ["POST"]),
        ("/api/trace", trace, ["GET"]),
        ("/api/trace.csv", trace_csv, ["GET"]),
        ("/api/devices", devices, ["GET"]),
        ("/api/setup/spf", spf, ["GET"]),
        ("/api/setup/doctor", doctor, ["POST"]),
        ("/api/mailboxes", mailboxes, ["GET"]),
        ("/api/openapi.json", openapi, ["GET"]),
    ]
    return [Route(path, guarded(fn), methods=methods) for path, fn, methods in routes]


def _row(r: CheckRow) -> dict[str, Any]:
    return {"name": r.name, "status": r.status, "detail": r.detail, "fix": r.fix}


def _mail(m: MailboxMessage) -> dict[str, Any]:
    return {
        "id": m.id,
        "mailbox": m.mailbox,
        "folder": m.folder,
        "from": m.mail_from,
        "to": list(m.rcpt_tos),
        "received_at": m.received_at,
        "size": m.size,
        "subject": m.subject,
    }


CSV_COLUMNS = (
    "id", "at", "kind", "queue_id", "message_id", "subject", "sender", "recipient", "device", "peer",
    "listener", "transport", "reply", "explanation", "actor", "detail", "side", "advice",
)  # fmt: skip


async def csv_rows(c: Console, q: TraceQuery) -> AsyncIterator[str]:
    """The trace as CSV, page by page (bounded memory at any size)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    left = q.limit
    query = dataclasses.replace(q, limit=min(1000, left))
    while left > 0:
        page = await c.deps.tracking.search(query)
        for e in page.events:
            row = event_json(e, c.explain)
            row["at"] = when(e.at)
            writer.writerow([_csv_safe(str(row.get(col) or "")) for col in CSV_COLUMNS])
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
        left -= len(page.events)
        if page.next_cursor is None or not page.events:
            break
        query = dataclasses.replace(query, before=page.next_cursor, limit=min(1000, left))


def _csv_safe(value: str) -> str:
    """No formula injection when the CSV is opened in a spreadsheet (OWASP "CSV Injection")."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value
