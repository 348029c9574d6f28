"""The sandbox's HTTPS application: identity platform, Microsoft Graph and a JSON admin API.

``create_app(ctx)`` returns one Starlette app; the runner serves it with uvicorn over TLS. Routes:

- identity (``login.microsoftonline.com`` role): see :mod:`relay365.sandbox.identity`
- Graph (``graph.microsoft.com`` role): see :mod:`relay365.sandbox.graph` (mail) and
  :mod:`relay365.sandbox.trace_api` (message trace); every response carries
  Graph's ``request-id``, ``client-request-id``, ``Date`` and ``x-ms-ags-diagnostic``
  (:mod:`relay365.sandbox.graph_wire`), every other response ``Date`` (the sandbox clock)
- admin API (sandbox only, no authentication; loopback only)::

    GET    /_sandbox/messages?mailbox=&folder=   stored messages (metadata)
    GET    /_sandbox/messages/{id}               metadata + content (``?raw=1``: message/rfc822)
    GET    /_sandbox/rejections                  rejection counters, keyed "<endpoint> <code>"
    GET    /_sandbox/faults                      pending faults
    POST   /_sandbox/faults                      add a fault (JSON fields of ``Fault``)
    DELETE /_sandbox/faults                      clear all faults
    POST   /_sandbox/clock/advance               {"seconds": n}
    POST   /_sandbox/quarantine/{id}/release     an admin releases a quarantined copy to the Inbox
    GET|POST /devicelogin                        the device code sign-in page (HTML form)
    POST   /_sandbox/devicecode/approve          {"user_code", "address", "password"}
    POST   /_sandbox/sessions/revoke             {"address"}: refresh tokens issued before now die

Faults: before routing, a request to the token endpoints (``POST /{tenant}/oauth2/...``) takes a
``("token", "request")`` fault and a request to Graph (``/v1.0/...`` and upload URLs) takes a
``("graph", "request")`` fault: ``reply`` answers that status (with the fault's headers and an
error body in the endpoint's own format), ``stall`` waits ``stall_seconds`` first (then replies, if
a reply is set, or proceeds), ``drop`` closes the connection without any response.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import json
import logging
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from relay365.sandbox.faults import Fault, FaultError
from relay365.sandbox.graph import GraphEndpoint
from relay365.sandbox.graph_wire import (
    graph_error,
    graph_headers,
    request_ids,
    start_request,
    with_response_headers,
)
from relay365.sandbox.identity import DeviceCodeRefused, IdentityEndpoint, parse_form
from relay365.sandbox.mailflow import NotQuarantined
from relay365.sandbox.store import MessageNotFound
from relay365.sandbox.tokens import OAuthError, error_response
from relay365.sandbox.trace_api import TraceEndpoint

if TYPE_CHECKING:
    from relay365.sandbox.context import SandboxContext

logger = logging.getLogger(__name__)


def _fault_endpoint(scope: Scope) -> str | None:
    path: str = scope.get("path", "")
    if path.startswith(("/v1.0/", "/api/gv1.0/")):
        return "graph"
    parts = path.strip("/").split("/")
    if scope.get("method") == "POST" and len(parts) >= 2 and parts[1] == "oauth2":
        return "token"
    return None


class SandboxApp(Starlette):
    """Starlette plus fault injection ahead of everything (a drop needs the raw connection)."""

    def __init__(self, ctx: SandboxContext, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        endpoint = _fault_endpoint(scope)
        # Every response carries Date; Graph's also its request ids and diagnostic (graph_wire).
        ids = start_request(scope) if endpoint == "graph" else None
        answer = with_response_headers(send, graph_headers(ids, self.ctx.clock.now()))
        fault = self.ctx.faults.take(endpoint, "request") if endpoint else None
        if endpoint is None or fault is None:
            await super().__call__(scope, receive, answer)
            return
        logger.info("fault on %s %s: %s", endpoint, scope.get("path"), fault.action)
        if fault.action == "drop":
            await _drop(send)
            return
        if fault.stall_seconds:
            await asyncio.sleep(fault.stall_seconds)
        if fault.reply:
            await _drain(receive)
            response = self._fault_response(endpoint, fault, scope)
            await response(scope, receive, answer)
            return
        await super().__call__(scope, receive, answer)

    def _fault_response(self, endpoint: str, fault: Fault, scope: Scope) -> Response:
        status = int((fault.reply or "503").split()[0])
        self.ctx.store.count_rejection(endpoint, f"{status} fault")
        headers = dict(fault.headers)
        if endpoint == "graph":
            response: Response = graph_error(
                status,
                _graph_code(status),
                "The service is temporarily unavailable (fault).",
                ids=request_ids(scope),
                now=self.ctx.clock.now(),
            )
        else:
            err = OAuthError(
                status,
                "temporarily_unavailable" if status >= 429 else "invalid_request",
                90033 if status >= 429 else 90000,
                "A transient error has occurred. Please try again.",
            )
            response = error_response(err, now=self.ctx.clock.now(), correlation_id=None)
        response.headers.update(headers)
        return response


def _graph_code(status: int) -> str:
    return {
        400: "BadRequest",
        401: "InvalidAuthenticationToken",
        403: "ErrorAccessDenied",
        404: "ResourceNotFound",
        429: "ApplicationThrottled",
        500: "InternalServerError",
        502: "BadGateway",
        503: "ServiceNotAvailable",
        504: "GatewayTimeout",
    }.get(status, "UnknownError")


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _drop(send: Send) -> None:
    """Close the TCP connection without a response (uvicorn: abort the cycle's transport)."""
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:  # not uvicorn: start a response and break it off
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-length", b"1")]})
        raise ConnectionAbortedError("fault: drop")
    transport.abort()
    for _ in range(100):  # let uvicorn notice, so it does not answer 500 on a dead connection
        if getattr(cycle, "disconnected", True):
            return
        await asyncio.sleep(0.01)


class AdminAPI:
    """The sandbox-only JSON API for tests and admins."""

    def __init__(self, ctx: SandboxContext, identity: IdentityEndpoint) -> None:
        self._ctx = ctx
        self._identity = identity

    def routes(self) -> list[Route]:
        return [
            Route("/devicelogin", self.device_login, methods=["GET", "POST"]),
            Route("/_sandbox/messages", self.messages, methods=["GET"]),
            Route("/_sandbox/messages/{id}", self.message, methods=["GET"]),
            Route("/_sandbox/rejections", self.rejections, methods=["GET"]),
            Route("/_sandbox/faults", self.faults, methods=["GET", "POST", "DELETE"]),
            Route("/_sandbox/clock/advance", self.advance, methods=["POST"]),
            Route("/_sandbox/quarantine/{id}/release", self.release, methods=["POST"]),
            Route("/_sandbox/devicecode/approve", self.approve, methods=["POST"]),
            Route("/_sandbox/sessions/revoke", self.revoke, methods=["POST"]),
        ]

    async def messages(self, request: Request) -> Response:
        found = self._ctx.store.list(
            mailbox=request.query_params.get("mailbox"), folder=request.query_params.get("folder")
        )
        return JSONResponse({"messages": [m.to_json() for m in found]})

    async def message(self, request: Request) -> Response:
        message_id = request.path_params["id"]
        try:
            meta = self._ctx.store.get(message_id)
            content = self._ctx.store.content(message_id)
        except MessageNotFound:
            return JSONResponse({"error": f"no message {message_id}"}, status_code=404)
        if request.query_params.get("raw"):
            return Response(content, media_type="message/rfc822")
        return JSONResponse({"message": meta.to_json(), "content": content.decode("utf-8", "replace")})

    async def release(self, request: Request) -> Response:
        message_id = request.path_params["id"]
        try:
            moved = self._ctx.mailflow.release(message_id)
        except MessageNotFound:
            return JSONResponse({"error": f"no message {message_id}"}, status_code=404)
        except NotQuarantined as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        return JSONResponse({"message": moved.to_json()})

    async def rejections(self, request: Request) -> Response:
        return JSONResponse(self._ctx.store.rejections())

    async def faults(self, request: Request) -> Response:
        if request.method == "DELETE":
            self._ctx.faults.clear()
            return JSONResponse({"faults": []})
        if request.method == "POST":
            try:
                data = await _json_object(request)
                headers = data.pop("headers", {}) or {}
                fault = Fault(
                    headers=MappingProxyType({str(k): str(v) for k, v in headers.items()}),
                    **data,
                )
            except (FaultError, TypeError, ValueError, AttributeError) as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            self._ctx.faults.add(fault)
        pending = [_fault_json(f) for f in self._ctx.faults.pending()]
        return JSONResponse({"faults": pending})

    async def advance(self, request: Request) -> Response:
        try:
            seconds = float((await _json_object(request))["seconds"])
            self._ctx.clock.advance(seconds)
        except (KeyError, TypeError, ValueError) as exc:
            return JSONResponse({"error": f"bad seconds: {exc}"}, status_code=400)
        return JSONResponse({"now": self._ctx.clock.now()})

    async def approve(self, request: Request) -> Response:
        try:
            data = await _json_object(request)
            address = self._identity.approve_device_code(
                user_code=str(data.get("user_code", "")),
                address=str(data.get("address", "")),
                password=str(data.get("password", "")),
            )
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except DeviceCodeRefused as exc:
            return JSONResponse({"error": str(exc)}, status_code=401)
        return JSONResponse({"approved": address})

    async def device_login(self, request: Request) -> Response:
        """The device code verification page (``verification_uri``), for people at a keyboard."""
        message = ""
        if request.method == "POST":
            form = parse_form(await request.body())
            try:
                who = self._identity.approve_device_code(
                    user_code=form.get("user_code", ""),
                    address=form.get("address", ""),
                    password=form.get("password", ""),
                )
                message = f"<p>Signed in as {html.escape(who)}. You can close this page.</p>"
            except DeviceCodeRefused as exc:
                message = f"<p>Sign-in refused: {html.escape(str(exc))}</p>"
        page = (
            "<!doctype html><title>Sandbox device login</title><h1>Enter code</h1>"
            f"{message}<form method=post>"
            "<label>Code <input name=user_code></label><br>"
            "<label>Mailbox <input name=address></label><br>"
            "<label>Password <input type=password name=password></label><br>"
            "<button>Sign in</button></form>"
        )
        return HTMLResponse(page)

    async def revoke(self, request: Request) -> Response:
        try:
            address = str((await _json_object(request))["address"])
        except (KeyError, ValueError) as exc:
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
        self._identity.revoke_sessions(address)
        return JSONResponse({"revoked": address})


def _fault_json(fault: Fault) -> dict[str, Any]:
    data = {f.name: getattr(fault, f.name) for f in dataclasses.fields(fault)}
    data["headers"] = dict(fault.headers)
    return data


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.body())
    except ValueError as exc:
        raise ValueError(f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    return data


def create_app(ctx: SandboxContext, *, device_code_interval: int = 5) -> Starlette:
    """The sandbox's HTTPS application for ``ctx``."""
    identity = IdentityEndpoint(ctx, device_code_interval=device_code_interval)
    graph = GraphEndpoint(ctx)
    trace = TraceEndpoint(ctx, graph)
    admin = AdminAPI(ctx, identity)
    app = SandboxApp(ctx, routes=[*admin.routes(), *graph.routes(), *trace.routes(), *identity.routes()])
    app.state.identity = identity
    app.state.graph = graph
    app.state.trace = trace
    return app
