"""A client for Exchange Online's message trace in Microsoft Graph.

::

    client = MessageTraceClient.for_transport(settings, tokens=token_source(settings, scope=GRAPH_SCOPE))
    results = await client.lookup([TraceRequest(message_id, recipient, sent_at), ...])
    await client.aclose()

Endpoints (https://learn.microsoft.com/graph/api/messagetracingroot-list-messagetraces,
https://learn.microsoft.com/graph/api/exchangemessagetrace-getdetailsbyrecipient), application
permission ``ExchangeMessageTrace.Read.All``::

    GET {graph_url}/admin/exchange/tracing/messageTraces?$filter=...&$top=5000   (then @odata.nextLink)
    GET {graph_url}/admin/exchange/tracing/messageTraces/{id}/getDetailsByRecipient(recipientAddress='...')

How it stays inside Microsoft's limits:

- :meth:`lookup` asks the fewest queries that cover a batch (:mod:`.plan`: time windows of at most 10
  days, one ``messageId`` query per message only for small windows), pages with ``$top=5000`` through
  ``@odata.nextLink`` (the whole URL, as Graph asks), and fetches a recipient's events only when
  ``want_details`` says so (by default when Microsoft did not deliver it to the Inbox);
- every request first takes a token from a :class:`~relay365.tracing.budget.TokenBucket` (by default
  80 of the tenant's 100 requests per 5 minutes);
- a 429 empties the bucket and waits ``Retry-After`` (Graph's throttling guidance: "wait the number of
  seconds specified in the Retry-After header", https://learn.microsoft.com/graph/throttling), in all at
  most ``max_wait`` seconds per request before :class:`~relay365.errors.TraceUnavailableError`;
- 403 raises :class:`~relay365.errors.TracePermissionError` at once (the permission is missing or
  the message trace service principal is not provisioned: retrying will not help), 400
  :class:`~relay365.errors.TraceQueryError`; 401 gets a new token once; 5xx and network errors are
  retried twice with a pause, then :class:`~relay365.errors.TraceUnavailableError`.

The client is core (relay365.tracing): it knows nothing of the sandbox; a test points ``graph_url`` at
it and drives ``clock``/``sleep`` with the sandbox clock.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from relay365.errors import (
    TokenError,
    TracePermissionError,
    TraceQueryError,
    TraceUnavailableError,
)
from relay365.settings import TransportSettings
from relay365.tracing.budget import TokenBucket
from relay365.tracing.model import TraceDetail, TraceRecord, TraceRequest, TraceResult
from relay365.tracing.plan import TraceQuery, plan

log = logging.getLogger(__name__)

PAGE_SIZE = 5000  # "Use $top to customize the page size, within the range of 1 and 5000"
TRACES_PATH = "/admin/exchange/tracing/messageTraces"
RETRIES = 2  # after the first attempt, for 5xx and network errors
RETRY_PAUSE = 5.0  # seconds, doubled each time, when the server sends no Retry-After


class TokenProvider(Protocol):
    """What the client needs of :class:`relay365.oauth.TokenSource`."""

    async def token(self) -> str: ...

    def invalidate(self) -> None: ...


def needs_details(record: TraceRecord) -> bool:
    """The default for :meth:`MessageTraceClient.lookup`: events are worth a request when the message
    did not simply land in the Inbox (Junk, quarantine, failure, a redirect) and the status is final."""
    return record.status.final and record.status.value != "delivered"


class MessageTraceClient:
    """Reads Microsoft's message trace for relay365, within the tenant's request quota."""

    def __init__(
        self,
        *,
        graph_url: str,
        tokens: TokenProvider,
        verify: ssl.SSLContext | bool = True,
        timeout: float = 60.0,
        budget: TokenBucket | None = None,
        wallclock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_wait: float = 900.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.graph_url = graph_url.rstrip("/")
        self._tokens = tokens
        self._sleep = sleep
        self._wallclock = wallclock
        self.budget = budget or TokenBucket.for_quota(sleep=sleep)
        self.max_wait = max_wait
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(verify=verify, timeout=timeout, trust_env=verify is True)
        self.requests = 0  # sent, for logs and tests
        self.throttled = 0  # 429 answers received

    @classmethod
    def for_transport(
        cls, settings: TransportSettings, *, tokens: TokenProvider, **options: Any
    ) -> MessageTraceClient:
        """A client for the tenant behind a graph/submission transport: its ``graph_url``, ``ca_file``
        (a private CA such as the sandbox's) and timeout. ``tokens``: a Graph token source for the same
        app registration (``token_source(settings, scope=GRAPH_SCOPE)``)."""
        verify: ssl.SSLContext | bool = True
        if settings.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(settings.ca_file))
        return cls(
            graph_url=settings.m365.graph_url,
            tokens=tokens,
            verify=verify,
            timeout=settings.timeout,
            **options,
        )

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    # -- high level ----------------------------------------------------------------------------

    async def lookup(
        self,
        requests: Sequence[TraceRequest],
        *,
        want_details: Callable[[TraceRecord], bool] = needs_details,
    ) -> list[TraceResult]:
        """What Microsoft's trace says of each request, in the order given."""
        queries = plan(requests, now=self._wallclock())
        found: dict[tuple[str, str], TraceRecord] = {}
        for query in queries.queries:
            for item in await self.traces(query):
                known = found.get(item.key)
                if known is None or item.received_at >= known.received_at:
                    found[item.key] = item  # the latest, if Microsoft got the message twice
        expired = {id(r) for r in queries.expired}
        events: dict[tuple[str, str], tuple[TraceDetail, ...]] = {}
        results: list[TraceResult] = []
        for request in requests:
            record = found.get(request.key)
            details: tuple[TraceDetail, ...] = ()
            if record is not None and want_details(record):
                if record.key not in events:
                    events[record.key] = tuple(await self.details(record))
                details = events[record.key]
            results.append(TraceResult(request, record, details, expired=id(request) in expired))
        log.info(
            "message trace: %d of %d recipients found with %d requests (%d throttled)",
            sum(1 for r in results if r.record is not None), len(results), self.requests, self.throttled,
        )  # fmt: skip
        return results

    async def probe(self) -> None:
        """One request that proves the app may read the trace (``doctor``): a query for a Message-ID
        that cannot exist, in the last hour. Raises :class:`TracePermissionError` without the
        permission, another :class:`~relay365.errors.TraceError` when the trace does not answer."""
        now = self._wallclock()
        query = TraceQuery(now - 3600, now - 60, message_id="relay365-permission-probe@invalid")
        url = f"{self.graph_url}{TRACES_PATH}"
        await self._get(url, {"$filter": query.filter(), "$top": "1"})

    async def traces(self, query: TraceQuery) -> list[TraceRecord]:
        """Every record one query matches, following ``@odata.nextLink``."""
        url = f"{self.graph_url}{TRACES_PATH}"
        params: dict[str, str] | None = {"$filter": query.filter(), "$top": str(PAGE_SIZE)}
        records: list[TraceRecord] = []
        next_url: str | None = url
        while next_url is not None:
            body = await self._get(next_url, params)
            records.extend(
                TraceRecord.from_graph(item) for item in body.get("value") or [] if isinstance(item, dict)
            )
            link = body.get("@odata.nextLink")
            next_url, params = (str(link), None) if link else (None, None)
        return records

    async def details(self, record: TraceRecord) -> list[TraceDetail]:
        """The events of one recipient (getDetailsByRecipient)."""
        address = record.recipient.replace("'", "''")
        function = f"getDetailsByRecipient(recipientAddress='{address}')"
        path = f"{TRACES_PATH}/{quote(record.trace_id, safe='')}/{function}"
        body = await self._get(f"{self.graph_url}{path}", None)
        items = [TraceDetail.from_graph(item) for item in body.get("value") or [] if isinstance(item, dict)]
        return sorted(items, key=lambda d: d.at)

    # -- one request ---------------------------------------------------------------------------

    async def _get(self, url: str, params: dict[str, str] | None) -> dict[str, Any]:
        waited = 0.0
        failures = 0
        refreshed = False
        while True:
            await self.budget.acquire()
            headers = {"Authorization": f"Bearer {await self._token()}", "Accept": "application/json"}
            self.requests += 1
            try:
                response = await self._http.get(url, params=params, headers=headers)
            except httpx.HTTPError as exc:
                failures += 1
                if failures > RETRIES:
                    raise TraceUnavailableError(f"message trace: {type(exc).__name__}: {exc}") from exc
                await self._pause(RETRY_PAUSE * 2 ** (failures - 1))
                continue
            status = response.status_code
            if status == 200:
                return _json(response)
            code, message = _error(response)
            if status == 429:
                self.throttled += 1
                self.budget.drain()
                wait = _retry_after(response) or RETRY_PAUSE * 2**self.throttled
                if waited + wait > self.max_wait:
                    raise TraceUnavailableError(
                        f"message trace throttled for more than {self.max_wait:.0f} s: {code}: {message}",
                        status=status, code=code,
                    )  # fmt: skip
                log.warning(
                    "message trace throttled (429 %s); waiting %.0f s as Retry-After asks", code, wait
                )
                waited += wait
                await self._pause(wait)
                continue
            if status == 401 and not refreshed:
                refreshed = True
                self._tokens.invalidate()
                continue
            if status == 403:
                raise TracePermissionError(
                    f"message trace refused (403 {code}): {message} The app registration needs the "
                    "application permission ExchangeMessageTrace.Read.All with admin consent, and the "
                    "tenant a service principal for app 8bd644d1-64a1-4d4b-ae52-2e0cbf64e373.",
                    status=status, code=code,
                )  # fmt: skip
            if status == 400:
                raise TraceQueryError(
                    f"message trace query refused (400 {code}): {message}", status=status, code=code
                )
            if status >= 500 and failures < RETRIES:
                failures += 1
                await self._pause(_retry_after(response) or RETRY_PAUSE * 2 ** (failures - 1))
                continue
            raise TraceUnavailableError(
                f"message trace: {status} {code}: {message}", status=status, code=code
            )

    async def _token(self) -> str:
        try:
            return await self._tokens.token()
        except TokenError as exc:
            raise TraceUnavailableError(f"message trace: no Graph token: {exc}") from exc

    async def _pause(self, seconds: float) -> None:
        await self._sleep(max(0.0, seconds))


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        raise TraceUnavailableError(f"message trace: the answer is not JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise TraceUnavailableError("message trace: the answer is not a JSON object")
    return body


def _error(response: httpx.Response) -> tuple[str, str]:
    """Graph's ``{"error": {"code", "message"}}`` (https://learn.microsoft.com/graph/errors)."""
    try:
        error = response.json().get("error", {})
        return str(error.get("code") or response.reason_phrase), " ".join(
            str(error.get("message", "")).split()
        )
    except (ValueError, AttributeError):
        return response.reason_phrase, response.text[:200]


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (RFC 9110 10.2.3: delay-seconds; an HTTP date is not used by Graph)."""
    value = response.headers.get("Retry-After", "").strip()
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
