"""The console's HTML pages, rendered on the server with Jinja2 (autoescaped). Forms post back with
the session's CSRF token; the only scripts are the static files under ``/static`` (live updates,
select-all), so the Content-Security-Policy can forbid inline script entirely."""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from relay365.admin import mime, sse
from relay365.admin.actions import Action, act, matching_ids
from relay365.admin.api import client_address
from relay365.admin.auth import Caller, LockedOut, NotLoggedIn
from relay365.admin.console import Console
from relay365.admin.forms import FormError
from relay365.admin.forms import form as read_form
from relay365.admin.security import SANDBOX_CSP
from relay365.admin.views import AGES, BadRequest, age, entry_json, event_json, queue_query, trace_query, when
from relay365.errors import SpoolError
from relay365.spool.model import QueueState

Handler = Callable[[Request], Awaitable[Response]]
QUEUE_FILTERS = ("state", "device", "sender", "recipient", "transport", "min_age", "order")
TRACE_FILTERS = (
    "sender",
    "recipient",
    "subject",
    "message_id",
    "queue_id",
    "device",
    "kind",
    "since",
    "until",
)


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("relay365.admin", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["when"] = when
    env.filters["age"] = age
    env.filters["size"] = lambda n: f"{n / 1024:.1f} KB" if n >= 1024 else f"{n} B"
    return env


def safe_next(target: str) -> str:
    """Only a local path (no open redirect to another site)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


def page_routes(c: Console) -> list[Route]:
    env = environment()
    d = c.deps

    def render(
        request: Request, name: str, who: Caller | None, status: int = 200, **ctx: Any
    ) -> HTMLResponse:
        html = env.get_template(name).render(
            who=who.principal if who else None,
            csrf=who.csrf if who else "",
            path=request.url.path,
            sandbox=d.mailboxes is not None,
            version=getattr(request.state, "version", ""),
            **ctx,
        )
        return HTMLResponse(html, status_code=status)

    async def login_form(request: Request) -> Response:
        return render(
            request, "login.html", None, next=safe_next(request.query_params.get("next", "/")), error=""
        )

    async def login(request: Request) -> Response:
        form = await read_form(request)
        name, password = str(form.get("username", "")), str(form.get("password", ""))
        target = safe_next(str(form.get("next", "/")))
        try:
            session = await c.guard.login(name, password, address=client_address(request))
        except LockedOut as e:
            return render(request, "login.html", None, 429, next=target, error=str(e))
        except NotLoggedIn:
            return render(request, "login.html", None, 401, next=target, error="Wrong user name or password.")
        response = RedirectResponse(target, status_code=303)
        c.guard.set_cookie(response, session)
        return response

    async def logout(request: Request) -> Response:
        await c.guard.require(request)
        response = RedirectResponse("/login", status_code=303)
        c.guard.logout(request, response)
        return response

    async def overview(request: Request) -> Response:
        who = await c.guard.require(request)
        return render(request, "overview.html", who, o=await c.overview(), live=True)

    async def queue(request: Request) -> Response:
        who = await c.guard.require(request)
        q = request.query_params
        query = queue_query(q)
        page = await d.queue.browse(query)
        filters = {k: q.get(k, "") for k in QUEUE_FILTERS}
        base = {k: v for k, v in filters.items() if v}
        next_url = (
            "/queue?" + urllib.parse.urlencode({**base, "cursor": page.next_cursor})
            if page.next_cursor
            else ""
        )
        return render(
            request,
            "queue.html",
            who,
            entries=[entry_json(e, c.explain) for e in page.entries],
            total=page.total,
            filters=filters,
            states=list(QueueState),
            ages=[a for a in AGES if a],
            next_url=next_url,
            first_url="/queue?" + urllib.parse.urlencode(base),
            paged=bool(query.cursor),
            now=d.status.now(),
            live=not query.cursor,
        )

    async def queue_action(request: Request) -> Response:
        who = await c.guard.require(request, operator=True)
        form = await read_form(request)
        action = str(form.get("action", ""))
        if action not in set(Action):
            raise BadRequest(f"action must be one of {', '.join(Action)}")
        if form.get("scope") == "filter":
            flt = {k: str(form.get(k, "")) for k in QUEUE_FILTERS}
            if not any(v for k, v in flt.items() if k != "order"):
                raise BadRequest("choose a filter first: acting on the whole queue needs at least one filter")
            ids = await matching_ids(d.queue, queue_query(flt))
        else:
            ids = [str(v) for v in form.getlist("id")]
        out = await act(
            d.queue,
            d.tracking,
            action=Action(action),
            ids=ids,
            actor=who.principal.name,
            address=client_address(request),
            now=d.status.now(),
        )
        back = safe_next(str(form.get("back", "/queue")))
        sep = "&" if "?" in back else "?"
        return RedirectResponse(f"{back}{sep}done={action}:{len(out.done)}", status_code=303)

    async def message(request: Request) -> Response:
        who = await c.guard.require(request)
        qid = request.path_params["queue_id"]
        try:
            m = await c.message(qid)
        except KeyError:
            return render(
                request, "error.html", who, 404, error=f"No message {qid} in the queue or the trace."
            )
        return render(request, "message.html", who, m=m, now=d.status.now(), live=True)

    async def trace(request: Request) -> Response:
        who = await c.guard.require(request)
        q = request.query_params
        filters = {k: q.get(k, "") for k in TRACE_FILTERS}
        searched = any(filters.values()) or "before" in q
        events: list[dict[str, Any]] = []
        next_url = ""
        if searched:
            page = await d.tracking.search(trace_query(q))
            events = [event_json(e, c.explain) for e in page.events]
            base = {k: v for k, v in filters.items() if v}
            if page.next_cursor:
                next_url = "/trace?" + urllib.parse.urlencode({**base, "before": page.next_cursor})
        csv_url = "/api/trace.csv?" + urllib.parse.urlencode(
            {**{k: v for k, v in filters.items() if v}, "limit": 100000}
        )
        return render(
            request,
            "trace.html",
            who,
            filters=filters,
            events=events,
            searched=searched,
            next_url=next_url,
            csv_url=csv_url,
        )

    async def devices(request: Request) -> Response:
        who = await c.guard.require(request)
        rows = [dataclasses.asdict(x) for x in d.devices.devices()]
        for row in rows:
            row["explanation"] = c.explain(row["last_refusal"]) if row["last_refusal"] else None
        return render(request, "devices.html", who, devices=rows, now=d.status.now(), live=True)

    async def setup(request: Request) -> Response:
        who = await c.guard.require(request, operator=request.method == "POST")
        checks = None
        if request.method == "POST" and d.setup is not None:
            c.guard.audit(who.principal.name, "ran the doctor", address=client_address(request))
            checks = await d.setup.doctor()
        spf = d.setup.spf() if d.setup else []
        return render(request, "setup.html", who, checks=checks, spf=spf, available=d.setup is not None)

    async def mailboxes(request: Request) -> Response:
        who = await c.guard.require(request)
        if d.mailboxes is None:
            return render(request, "error.html", who, 404, error="No sandbox runs in this process.")
        q = request.query_params
        mailbox, folder = q.get("mailbox") or None, q.get("folder") or None
        return render(
            request,
            "mailboxes.html",
            who,
            boxes=d.mailboxes.mailboxes(),
            mailbox=mailbox or "",
            folder=folder or "",
            folders=("Inbox", "SentItems", "Internet"),
            messages=sorted(d.mailboxes.messages(mailbox, folder), key=lambda m: -m.received_at),
            live=True,
        )

    async def mailbox_message(request: Request) -> Response:
        who = await c.guard.require(request)
        if d.mailboxes is None:
            return render(request, "error.html", who, 404, error="No sandbox runs in this process.")
        mid = request.path_params["message_id"]
        try:
            m = d.mailboxes.message(mid)
            parts = mime.split(d.mailboxes.content(mid))
        except LookupError:
            return render(request, "error.html", who, 404, error=f"No stored message {mid}.")
        return render(request, "mailbox_message.html", who, m=m, parts=parts)

    async def mailbox_html(request: Request) -> Response:
        """The message's HTML for an ``<iframe sandbox>``: its own CSP forbids script, remote loads
        and forms, and puts it in a unique origin (``sandbox``)."""
        await c.guard.require(request)
        if d.mailboxes is None:
            return Response(status_code=404)
        try:
            parts = mime.split(d.mailboxes.content(request.path_params["message_id"]))
        except LookupError:
            return Response(status_code=404)
        return HTMLResponse(
            parts.html, headers={"content-security-policy": SANDBOX_CSP, "x-frame-options": "SAMEORIGIN"}
        )

    def guarded(fn: Handler) -> Handler:
        async def run(request: Request) -> Response:
            request.state.version = sse.version(c)  # before any data is read: no change is missed
            try:
                return await fn(request)
            except (BadRequest, FormError) as e:
                who = c.guard.caller(request)
                return render(request, "error.html", who, 400, error=str(e))
            except SpoolError as e:
                who = c.guard.caller(request)
                return render(request, "error.html", who, 503, error=f"The spool cannot be read: {e}")

        return run

    table: list[tuple[str, Handler, list[str]]] = [
        ("/login", login_form, ["GET"]),
        ("/login", login, ["POST"]),
        ("/logout", logout, ["POST"]),
        ("/", overview, ["GET"]),
        ("/queue", queue, ["GET"]),
        ("/queue/action", queue_action, ["POST"]),
        ("/message/{queue_id}", message, ["GET"]),
        ("/trace", trace, ["GET"]),
        ("/devices", devices, ["GET"]),
        ("/setup", setup, ["GET", "POST"]),
        ("/mailboxes", mailboxes, ["GET"]),
        ("/mailboxes/{message_id}", mailbox_message, ["GET"]),
        ("/mailboxes/{message_id}/html", mailbox_html, ["GET"]),
    ]
    return [Route(path, guarded(fn), methods=methods) for path, fn, methods in table]
