"""Microsoft Graph ``sendMail`` (exchange-online.md, "Graph sendMail (option 4) in detail").

The device's message goes as MIME (base64 ``text/plain``), so it arrives as the device wrote it.
Graph takes the recipients of a MIME message from its To/Cc/Bcc headers, so the envelope is made
exact: recipients of the envelope that are not in To/Cc are added as Bcc (Exchange removes Bcc on
submission). When To/Cc name someone who is *not* in this envelope (the message was split across
routes), the message is created as a draft and its recipients are set to the envelope before it is
sent. Above the ~4 MB request limit the message goes through a draft and upload sessions
(``graph_large.py``). A route with ``save_to_sent_items = false`` uses JSON sendMail instead, the only
form in which Graph skips the Sent Items copy. ``Retry-After`` on 429 is honoured; at most 4 requests
per mailbox at once.
"""

from __future__ import annotations

import asyncio
import base64
import email.policy
import logging
import ssl
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from typing import Any

import httpx

from relay365.errors import ConnectionLostError, TokenError, TransientDeliveryError, UpstreamUnreachableError
from relay365.oauth import GRAPH_SCOPE, TokenSource, token_source
from relay365.settings import TransportSettings
from relay365.transports.base import OutboundMessage, Outcome, PaceLimits, RecipientResult, TransportKind
from relay365.transports.graph_large import send_json, send_via_draft
from relay365.transports.replies import is_transient_graph

log = logging.getLogger(__name__)
# Graph's request limit is 4 MB; base64 grows the message by a third, so MIME sendMail takes
# messages up to ~2.9 MB and larger ones go through the upload path.
REQUEST_LIMIT = 4 * 1024 * 1024
MIME_LIMIT = REQUEST_LIMIT * 3 // 4 - 64 * 1024
# Graph throttling: 10,000 requests per 10 minutes per app and mailbox (exchange-online.md).
GRAPH_REQUESTS_PER_WINDOW = 10_000
GRAPH_WINDOW = 600.0


class GraphError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: float | None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after

    @property
    def reply(self) -> str:
        return f"{self.status} {self.code}: {' '.join(self.message.split())[:300]}"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def graph_error(response: httpx.Response) -> GraphError:
    try:
        err = response.json().get("error", {})
        code, message = str(err.get("code", "")), str(err.get("message", ""))
    except ValueError:
        code, message = "", response.text[:200]
    return GraphError(response.status_code, code or response.reason_phrase, message, _retry_after(response))


def classify(e: GraphError) -> Outcome:
    """The one transient/permanent decision for Graph answers: the reply catalogue's (permission,
    scope and a wrong mailbox are the admin's to fix, so mail waits; reliability.md)."""
    return Outcome.TRANSIENT if is_transient_graph(e.status, e.code, e.message) else Outcome.PERMANENT


def envelope_recipients(body: bytes, rcpts: tuple[str, ...]) -> tuple[list[str], list[str], list[str], bool]:
    """(to, cc, bcc) restricted to the envelope, and whether the headers name exactly those."""
    head = BytesHeaderParser(policy=email.policy.compat32).parsebytes(body)
    wanted = {r.lower(): r for r in rcpts}
    to = [a for _, a in getaddresses(head.get_all("To", []))]
    cc = [a for _, a in getaddresses(head.get_all("Cc", []))]
    visible = {a.lower() for a in to + cc if a}
    faithful = visible <= wanted.keys()
    to_in = [a for a in to if a.lower() in wanted]
    cc_in = [a for a in cc if a.lower() in wanted and a.lower() not in {t.lower() for t in to_in}]
    bcc = [r for k, r in wanted.items() if k not in visible]
    return to_in, cc_in, bcc, faithful


def with_bcc(body: bytes, bcc: list[str]) -> bytes:
    """Replace any Bcc header by the envelope-only recipients (Exchange strips Bcc when sending)."""
    end = body.find(b"\r\n\r\n")
    head, rest = (body[: end + 2], body[end + 2 :]) if end >= 0 else (body, b"")
    lines, skip = [], False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and skip:
            continue
        skip = line.lower().startswith(b"bcc:")
        if not skip and line:
            lines.append(line)
    if bcc:
        lines.append(b"Bcc: " + ", ".join(bcc).encode("utf-8"))
    return b"\r\n".join(lines) + b"\r\n" + rest


class GraphTransport:
    def __init__(self, settings: TransportSettings, *, helo_name: str = "") -> None:
        m = settings.m365
        assert m.mailbox is not None
        self.name = settings.name
        self.mailbox = m.mailbox
        self._s = settings
        self._base = f"{m.graph_url}/users/{m.mailbox}"
        self._tokens: TokenSource = token_source(settings, scope=GRAPH_SCOPE)
        self.pacing_key = f"graph:{m.client_id}:{m.mailbox.lower()}"
        self.pacing = PaceLimits(
            messages_per_window=GRAPH_REQUESTS_PER_WINDOW,
            window=GRAPH_WINDOW,
            recipients_per_day=m.recipients_per_day,
            concurrency=m.connections,
        )
        self._slots = asyncio.Semaphore(m.connections)
        self._client = httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=str(settings.ca_file)) if settings.ca_file else True,
            timeout=settings.timeout,
            trust_env=settings.ca_file is None,
        )

    @property
    def mailbox_url(self) -> str:
        return self._base

    async def request(self, method: str, url: str, *, auth: bool = True, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if auth:
            try:
                headers["Authorization"] = f"Bearer {await self._tokens.token()}"
            except TokenError as e:
                raise TransientDeliveryError(f"454 4.7.0 Graph token unavailable: {e}") from e
        async with self._slots:
            try:
                response = await self._client.request(method, url, headers=headers, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError) as e:
                # RFC 3463 X.4.1: no connection at all; every request would fail the same way.
                raise UpstreamUnreachableError(
                    f"451 4.4.1 Graph {method} failed: {type(e).__name__}: {e}"
                ) from e
            except httpx.HTTPError as e:
                # X.4.2: the connection broke during this request (read error, timeout, reset).
                raise ConnectionLostError(f"451 4.4.2 Graph {method} failed: {type(e).__name__}: {e}") from e
        if response.status_code >= 400:
            error = graph_error(response)
            if error.status == 401:
                self._tokens.invalidate()
            raise error
        return response

    @property
    def token_source(self) -> TokenSource:
        """The OAuth token source, read by the console."""
        return self._tokens

    async def deliver(self, message: OutboundMessage) -> list[RecipientResult]:
        body = await message.read_body()
        to, cc, bcc, faithful = envelope_recipients(body, message.rcpt_tos)
        try:
            reply = await self._send(body, to, cc, bcc, faithful)
        except GraphError as e:
            outcome = classify(e)
            if outcome is Outcome.TRANSIENT and e.status in (401, 403, 404):
                log.critical("ALERT %s: Graph refused %s: %s (mail waits)", self.name, self.mailbox, e.reply)
            return [RecipientResult(r, outcome, e.reply, e.retry_after) for r in message.rcpt_tos]
        return [RecipientResult(r, Outcome.DELIVERED, reply) for r in message.rcpt_tos]

    async def _send(self, body: bytes, to: list[str], cc: list[str], bcc: list[str], faithful: bool) -> str:
        if not self._s.m365.save_to_sent_items:
            reply = await send_json(self, body, to=to, cc=cc, bcc=bcc, limit=REQUEST_LIMIT)
            if reply is not None:
                return reply
            log.warning(
                "%s: a %d-byte message is over Graph's request limit; it goes through a draft,"
                " which Graph always keeps in Sent Items",
                self.name,
                len(body),
            )
        if faithful and len(body) <= MIME_LIMIT:
            return await self._send_mime(with_bcc(body, bcc))
        return await send_via_draft(self, body, to=to, cc=cc, bcc=bcc, small=len(body) <= MIME_LIMIT)

    async def _send_mime(self, body: bytes) -> str:
        payload = base64.b64encode(body)
        await self.request(
            "POST", f"{self._base}/sendMail", content=payload, headers={"Content-Type": "text/plain"}
        )
        return "202 Accepted (Graph sendMail)"

    async def close(self) -> None:
        await self._client.aclose()
        self._tokens.close()


# Graph sendMail has no envelope sender: the mailbox in the URL sends (and would get the bounces).
KIND = TransportKind(
    type="graph",
    factory=lambda settings, helo: GraphTransport(settings, helo_name=helo),
    carries_null_sender=False,
)
