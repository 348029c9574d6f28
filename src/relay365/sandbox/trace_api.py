"""Graph's message trace on the sandbox (the ``graph.microsoft.com`` role)::

    GET /v1.0/admin/exchange/tracing/messageTraces?$filter=&$top=&$skiptoken=
    GET /v1.0/admin/exchange/tracing/messageTraces/{id}/getDetailsByRecipient(recipientAddress='{address}')

https://learn.microsoft.com/graph/api/messagetracingroot-list-messagetraces and
https://learn.microsoft.com/graph/api/exchangemessagetrace-getdetailsbyrecipient. In Graph's order:

1. the bearer token (401 ``InvalidAuthenticationToken``, as for every sandbox Graph call);
2. the permission ``ExchangeMessageTrace.Read.All`` (application role or delegated scope), else 403
   ``Forbidden``. Graph documents no body for this API; the sandbox uses the wording Graph sends for
   a missing application role elsewhere ("Missing role permissions on the request. API requires one
   of '...'. Roles on the request '...'.");
3. the tenant's quota: at most ``trace_requests_per_window`` (100) requests in a running window of
   ``trace_window_seconds`` (300) on the sandbox clock, list and details together ("All calls to
   message trace or message trace detail share the same quota. For a tenant, a maximum of 100 query
   message trace requests will be accepted within a 5-minute running window", Exchange Team blog,
   Jan 2026). A request over it gets 429 ``TooManyRequests`` with ``Retry-After`` (seconds until the
   oldest accepted request leaves the window) and is not counted, since it was not accepted;
4. the query (400 ``BadRequest``, :mod:`.trace_query`), then ``200`` with ``@odata.context``,
   ``value`` and, when more records match, ``@odata.nextLink``.

Every refusal is counted as ``trace <status> <code>`` in the rejection counters, so a test can prove
that a client never hit the quota. getDetailsByRecipient answers 404 ``ResourceNotFound`` for an
unknown message trace id and an empty collection for a recipient the message did not have (sandbox
choices: Microsoft documents neither).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay365.sandbox.graph_wire import GraphError, graph_error, request_ids
from relay365.sandbox.trace_query import ALLOWED_OPTIONS, Cursor, bad_request, parse_filter, parse_top

if TYPE_CHECKING:
    from relay365.sandbox.context import SandboxContext
    from relay365.sandbox.graph import GraphEndpoint
    from relay365.sandbox.tokens import AccessClaims

logger = logging.getLogger(__name__)

PERMISSION = "ExchangeMessageTrace.Read.All"
BASE = "/v1.0/admin/exchange/tracing/messageTraces"
_DETAILS = re.compile(
    r"(?:microsoft\.graph\.)?getDetailsByRecipient\(recipientAddress='((?:[^']|'')*)'\)", re.IGNORECASE
)


class TraceQuota:
    """Accepted requests of the tenant in the running window (thread-safe, sandbox clock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accepted: deque[float] = deque()

    def admit(self, *, now: float, limit: int, window: float) -> float | None:
        """None if the request is accepted (and counted), else the seconds to wait (Retry-After)."""
        with self._lock:
            while self._accepted and self._accepted[0] <= now - window:
                self._accepted.popleft()
            if len(self._accepted) >= limit:
                return max(1.0, math.ceil(self._accepted[0] + window - now))
            self._accepted.append(now)
            return None

    def used(self, *, now: float, window: float) -> int:
        with self._lock:
            return sum(1 for t in self._accepted if t > now - window)


class TraceEndpoint:
    """The two message trace routes, sharing the Graph endpoint's authentication."""

    def __init__(self, ctx: SandboxContext, graph: GraphEndpoint) -> None:
        self.ctx = ctx
        self._graph = graph
        self.quota = TraceQuota()

    def routes(self) -> list[Route]:
        return [
            Route(BASE, self.list_traces, methods=["GET"]),
            Route(BASE + "/{trace_id}/{function}", self.details, methods=["GET"]),
        ]

    async def list_traces(self, request: Request) -> Response:
        try:
            self._admit(request)
            return self._list(request)
        except GraphError as err:
            return self._fail(request, err)

    async def details(self, request: Request) -> Response:
        try:
            self._admit(request)
            function = request.path_params["function"]
            match = _DETAILS.fullmatch(function)
            if match is None:
                raise bad_request(
                    f"Unsupported function '{function}'; use getDetailsByRecipient(recipientAddress='...')."
                )
            recipient = match.group(1).replace("''", "'").strip().lower()
            trace_id = request.path_params["trace_id"]
            records = self.ctx.trace.for_message(trace_id)
            if not records:
                raise GraphError(404, "ResourceNotFound", f"The message trace '{trace_id}' was not found.")
            now = self.ctx.clock.now()
            value: list[dict[str, Any]] = []
            for record in records:
                if record.recipient.lower() == recipient:
                    value = record.details_to_graph(now)
            context = "$metadata#Collection(microsoft.graph.exchangeMessageTraceDetail)"
            return JSONResponse({"@odata.context": f"{self._root(request)}/{context}", "value": value})
        except GraphError as err:
            return self._fail(request, err)

    # -- the common path -----------------------------------------------------------------------

    def _admit(self, request: Request) -> None:
        claims = self._graph.authenticate(request)
        if not _has_permission(claims):
            raise GraphError(403, "Forbidden", _missing_permission(claims))
        limits = self.ctx.tenant.limits
        wait = self.quota.admit(
            now=self.ctx.clock.now(),
            limit=limits.trace_requests_per_window,
            window=limits.trace_window_seconds,
        )
        if wait is not None:
            raise GraphError(
                429,
                "TooManyRequests",
                f"Too many requests: the tenant is over its message trace limit of "
                f"{limits.trace_requests_per_window} requests per {limits.trace_window_seconds} seconds.",
                headers={"Retry-After": str(int(wait))},
            )

    def _list(self, request: Request) -> Response:
        params = request.query_params
        for name in params:
            if name.lower() not in ALLOWED_OPTIONS:
                raise bad_request(f"Query option '{name}' is not supported for messageTraces.")
        top = parse_top(params.get("$top"))
        query = parse_filter(params.get("$filter"))
        now = self.ctx.clock.now()
        token = params.get("$skiptoken")
        cursor = Cursor.decode(token) if token else None
        start, end = (cursor.start, cursor.end) if cursor is not None else query.window(now)
        match = query.matcher()
        page: list[dict[str, Any]] = []
        last = None
        more = False
        for record in self.ctx.trace.records():
            if not start <= math.floor(record.received_at) <= end:  # Graph times are whole seconds
                continue
            if cursor is not None and not cursor.after(record):
                continue
            if not match(record, record.status_at(now)):
                continue
            if len(page) == top:
                more = True
                break
            page.append(record.to_graph(now))
            last = record
        body: dict[str, Any] = {
            "@odata.context": f"{self._root(request)}/$metadata#admin/exchange/tracing/messageTraces",
            "value": page,
        }
        if more and last is not None:
            following = Cursor(start, end, last.received_at, last.trace_id, last.recipient.lower())
            options = {k: v for k, v in params.items() if k.lower() != "$skiptoken"}
            options["$skiptoken"] = following.encode()
            body["@odata.nextLink"] = f"{self._root(request)}{BASE[len('/v1.0') :]}?{urlencode(options)}"
        return JSONResponse(body)

    def _root(self, request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}/v1.0"

    def _fail(self, request: Request, err: GraphError) -> Response:
        self.ctx.store.count_rejection("trace", f"{err.status} {err.code}")
        logger.info("message trace refused %s: %s", request.url.path, err)
        return graph_error(
            err.status, err.code, err.message, ids=request_ids(request.scope), now=self.ctx.clock.now(),
            headers=err.headers,
        )  # fmt: skip


def _has_permission(claims: AccessClaims) -> bool:
    return PERMISSION in (claims.roles if claims.app_only else claims.scopes)


def _missing_permission(claims: AccessClaims) -> str:
    kind, held = ("role", claims.roles) if claims.app_only else ("scope", claims.scopes)
    return (
        f"Missing {kind} permissions on the request. API requires one of '{PERMISSION}'. "
        f"{kind.capitalize()}s on the request '{', '.join(sorted(held))}'."
    )
