"""The sandbox's Microsoft Graph mail endpoints (the ``graph.microsoft.com`` role).

::

    POST /v1.0/users/{id|upn}/sendMail        JSON or MIME (text/plain, base64); 202, empty body
    POST /v1.0/users/{id}/messages            create a draft (JSON or MIME); 201     } graph_upload
    POST /v1.0/users/{id}/messages/{mid}/attachments[/createUploadSession]            }
    POST /v1.0/users/{id}/messages/{mid}/send  send a draft; 202                        }
    PUT|DELETE /api/gv1.0/...                 the upload URL an upload session returns  }
    (each also under /v1.0/me/... for delegated tokens)

Every /v1.0 request goes through :meth:`GraphEndpoint.call`, in Graph's order: bearer token (401
``InvalidAuthenticationToken`` with ``WWW-Authenticate``), user (404 ``ErrorInvalidUser``),
permission and RBAC scope (403 ``ErrorAccessDenied``), throttling per app per mailbox (429
``ApplicationThrottled`` with ``Retry-After``: more than ``graph_concurrent_per_mailbox`` requests
in flight, "Application is over its MailboxConcurrency limit.", or more than
``graph_requests_per_window`` in ``graph_window_seconds``), then the request body, which may not
exceed ``graph_max_request_bytes`` (413). A request holds its concurrency slot while its body
arrives, so a slow upload occupies the mailbox as it does in Exchange Online.
https://learn.microsoft.com/graph/throttling-limits#outlook-service-limits

JSON bodies are read as OData reads them, property names without regard to case (``Message`` and
``SaveToSentItems`` from msgraph-sdk; :mod:`graph_wire`). A submitted message then counts against the
mailbox's Exchange sending limits, shared with SMTP AUTH (``ctx.sending``): over the rolling daily
recipient limit it is accepted and refused with an NDR into the sender's Inbox, over the per-minute
rate it is delayed (counted as throttled), as for every client of the mailbox.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses, make_msgid
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay365.sandbox.graph_message import Caller, Handler, format_address, message_from_json
from relay365.sandbox.graph_upload import Drafts
from relay365.sandbox.graph_wire import (
    GraphError,
    graph_error,
    parse_json,
    parse_mime,
    read_limited,
    request_ids,
)
from relay365.sandbox.mailflow import Submission
from relay365.sandbox.ndr import non_delivery_report
from relay365.sandbox.tokens import (
    GRAPH_RESOURCE,
    AccessClaims,
    InvalidToken,
    may_use_mailbox,
    object_id,
)

if TYPE_CHECKING:
    from relay365.sandbox.context import SandboxContext
    from relay365.sandbox.tenant import Mailbox

logger = logging.getLogger(__name__)

GRAPH_WWW_AUTHENTICATE = (
    'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize",'
    ' client_id="00000003-0000-0000-c000-000000000000"'
)
ACCESS_DENIED = "Access is denied. Check credentials and try again."


class _Throttle:
    """Per (app, mailbox): requests in flight and request times in the sliding window."""

    def __init__(self) -> None:
        self._in_flight: dict[tuple[str, str], int] = {}
        self._times: dict[tuple[str, str], deque[float]] = {}

    def enter(
        self, key: tuple[str, str], *, now: float, concurrent: int, per_window: int, window: float
    ) -> None:
        times = self._times.setdefault(key, deque())
        while times and times[0] <= now - window:
            times.popleft()
        times.append(now)  # every request accrues against the limit, throttled ones too
        if len(times) > per_window:
            retry = max(1, math.ceil(times[0] + window - now))
            raise GraphError(
                429,
                "ApplicationThrottled",
                "Application is over its MailboxRequests limit.",
                headers={"Retry-After": str(retry)},
            )
        if self._in_flight.get(key, 0) >= concurrent:
            raise GraphError(
                429,
                "ApplicationThrottled",
                "Application is over its MailboxConcurrency limit.",
                headers={"Retry-After": "1"},
            )
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def leave(self, key: tuple[str, str]) -> None:
        self._in_flight[key] -= 1

    def in_flight(self, key: tuple[str, str]) -> int:
        return self._in_flight.get(key, 0)


class GraphEndpoint:
    """Graph sendMail plus the draft / upload-session path (see :mod:`graph_upload`)."""

    def __init__(self, ctx: SandboxContext) -> None:
        self.ctx = ctx
        self._throttle = _Throttle()
        self.drafts = Drafts(self)

    def routes(self) -> list[Route]:
        routes: list[Route] = []
        for base in ("/v1.0/users/{user}", "/v1.0/me"):
            routes.append(Route(f"{base}/sendMail", self.send_mail, methods=["POST"]))
            routes.extend(self.drafts.routes(base))
        routes.extend(self.drafts.upload_routes())
        return routes

    def in_flight(self, app_id: str, mailbox: str) -> int:
        """Requests of this app for this mailbox being served right now."""
        return self._throttle.in_flight((app_id.lower(), mailbox.lower()))

    async def send_mail(self, request: Request) -> Response:
        return await self.call(request, "Mail.Send", self._send_mail)

    # -- the common request path ---------------------------------------------------------------

    async def call(self, request: Request, permission: str, handler: Handler) -> Response:
        try:
            claims = self.authenticate(request)
            caller = Caller(claims=claims, mailbox=self._mailbox(request, claims))
            if not caller.has(permission) or not may_use_mailbox(claims, self.ctx.tenant, caller.mailbox):
                raise GraphError(403, "ErrorAccessDenied", ACCESS_DENIED)
            limits = self.ctx.tenant.limits
            key = (claims.app_id.lower(), caller.mailbox.address.lower())
            self._throttle.enter(
                key,
                now=self.ctx.clock.now(),
                concurrent=limits.graph_concurrent_per_mailbox,
                per_window=limits.graph_requests_per_window,
                window=limits.graph_window_seconds,
            )
            try:
                body = await read_limited(request, limits.graph_max_request_bytes)
                return await handler(request, caller, body)
            finally:
                self._throttle.leave(key)
        except GraphError as err:
            return self.fail(request, err)

    def fail(self, request: Request, err: GraphError) -> Response:
        self.ctx.store.count_rejection("graph", f"{err.status} {err.code}")
        logger.info("graph refused %s %s: %s", request.method, request.url.path, err)
        ids = request_ids(request.scope)
        now = self.ctx.clock.now()
        return graph_error(err.status, err.code, err.message, ids=ids, now=now, headers=err.headers)

    def authenticate(self, request: Request) -> AccessClaims:
        """The bearer token's claims, or 401 InvalidAuthenticationToken as Graph answers it."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise GraphError(
                401,
                "InvalidAuthenticationToken",
                "Access token is empty.",
                headers={"WWW-Authenticate": GRAPH_WWW_AUTHENTICATE},
            )
        try:
            return self.ctx.issuer.validate(token, audience=GRAPH_RESOURCE)
        except InvalidToken as exc:
            raise GraphError(
                401,
                "InvalidAuthenticationToken",
                token_error_message(exc.reason, token),
                headers={"WWW-Authenticate": GRAPH_WWW_AUTHENTICATE},
            ) from exc

    def _mailbox(self, request: Request, claims: AccessClaims) -> Mailbox:
        user = request.path_params.get("user")
        if user is None:  # /me
            if claims.upn is None:
                raise GraphError(
                    400, "BadRequest", "/me request is only valid with delegated authentication flow."
                )
            user = claims.upn
        mailbox = self.ctx.tenant.mailbox(user) or next(
            (m for m in self.ctx.tenant.mailboxes.values() if object_id(m.address) == user.lower()),
            None,
        )
        if mailbox is None:
            raise GraphError(404, "ErrorInvalidUser", f"The requested user '{user}' is invalid.")
        if not mailbox.licensed and not mailbox.shared:
            raise GraphError(
                404,
                "MailboxNotEnabledForRESTAPI",
                "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
            )
        return mailbox

    # -- sendMail ------------------------------------------------------------------------------

    async def _send_mail(self, request: Request, caller: Caller, body: bytes) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "text/plain":
            message = parse_mime(body)
            save = True
        else:
            data = parse_json(body)
            raw = data.get("message")
            if not isinstance(raw, Mapping):
                raise GraphError(400, "ErrorInvalidRequest", "The 'message' parameter is required.")
            save = data.get("saveToSentItems", True)
            if not isinstance(save, bool):
                raise GraphError(
                    400, "BadRequest", "Cannot convert the literal to the expected type 'Edm.Boolean'."
                )
            message = message_from_json(raw, mailbox=caller.mailbox)
        self.deliver(caller, message, save_to_sent_items=save)
        return Response(status_code=202)

    def deliver(self, caller: Caller, message: EmailMessage, *, save_to_sent_items: bool) -> None:
        """Submit as Exchange would: stamp, check Send As, file copies (Bcc hidden from recipients)."""
        mailbox = caller.mailbox
        if message["From"] is None:
            message["From"] = format_address(mailbox.address, mailbox.display_name)
        if message["Date"] is None:
            message["Date"] = format_datetime(datetime.fromtimestamp(self.ctx.clock.now(), UTC))
        if message["Message-ID"] is None:
            message["Message-ID"] = make_msgid(domain=mailbox.address.rpartition("@")[2])
        senders = getaddresses(message.get_all("From", []))
        sender = (senders[0][1] if senders else "").lower()
        if sender != mailbox.address.lower() and sender not in mailbox.send_as:
            raise GraphError(
                403,
                "ErrorSendAsDenied",
                "The user account which was used to submit this request does not have the right to "
                "send mail on behalf of the specified sending account., Cannot submit message.",
            )
        recipients: list[str] = []
        for name in ("To", "Cc", "Bcc"):
            for _, address in getaddresses(message.get_all(name, [])):
                if address and address.lower() not in (r.lower() for r in recipients):
                    recipients.append(address)
        if not recipients:
            raise GraphError(
                400, "ErrorInvalidRecipients", "At least one recipient is required, but none were found."
            )
        full = message.as_bytes(policy=policy.SMTP)
        if len(full) > self.ctx.tenant.limits.max_message_size:
            raise GraphError(
                400,
                "ErrorMessageSizeExceeded",
                "The message exceeds the maximum supported size., Cannot save changes made to an "
                "item to store.",
            )
        deferred = self._within_sending_limits(caller, message, recipients, full)
        if deferred is None:
            return
        del message["Bcc"]
        visible = message.as_bytes(policy=policy.SMTP)
        store = self.ctx.store
        self.ctx.mailflow.accept(
            Submission(
                endpoint="graph",
                mail_from=sender,
                recipients=tuple(recipients),
                content=visible,
                authenticated_as=caller.identity,
                client_ip="",
                deferred_seconds=deferred,
            )
        )
        if save_to_sent_items:
            store.add(
                folder="SentItems",
                mailbox=mailbox.address,
                endpoint="graph",
                mail_from=sender,
                rcpt_tos=recipients,
                authenticated_as=caller.identity,
                content=full,
            )
        logger.info(
            "graph accepted mail from %s for %d recipients (by %s)",
            sender,
            len(recipients),
            caller.identity,
        )

    def _within_sending_limits(
        self, caller: Caller, message: EmailMessage, recipients: list[str], content: bytes
    ) -> float | None:
        """Exchange's per-mailbox sending limits apply to Graph as to every client of the mailbox
        (https://learn.microsoft.com/office365/servicedescriptions/exchange-online-service-description/
        exchange-online-limits#sending-limits). sendMail is accepted (202) before transport submits
        it, so a message over the rolling 24-hour recipient limit is accepted and then refused with
        an NDR to the sender (NDR reference, 5.1.90); over 30 messages a minute it is delayed, not
        refused (counted as throttled, as on the SMTP endpoint)."""
        mailbox = caller.mailbox.address
        sending = self.ctx.sending
        if sending.recipients_left_today(mailbox) < len(recipients):
            self.ctx.store.count_rejection("graph", "550 5.1.90")
            ndr = non_delivery_report(
                original=message,
                recipients=recipients,
                reply=RECIPIENT_RATE_LIMIT,
                reporting_host=f"{mailbox.rpartition('@')[2]}",
                now=self.ctx.clock.now(),
            )
            self.ctx.store.add(
                folder="Inbox",
                mailbox=mailbox,
                endpoint="graph",
                mail_from="",
                rcpt_tos=[mailbox],
                authenticated_as=None,
                content=ndr,
            )
            self.ctx.mailflow.refuse_after_acceptance(
                Submission(
                    endpoint="graph",
                    mail_from=mailbox,
                    recipients=tuple(recipients),
                    content=content,
                    authenticated_as=caller.identity,
                    client_ip="",
                ),
                RECIPIENT_RATE_LIMIT,
            )
            logger.info("graph: %s is over its daily recipient limit; NDR to its Inbox", mailbox)
            return None
        if sending.record_message(mailbox, len(recipients)):
            self.ctx.store.count_rejection("graph", "throttled")
            return float(self.ctx.tenant.limits.submission_window_seconds)
        return 0.0


# NDR reference (non-delivery-reports-in-exchange-online), row 5.1.90.
RECIPIENT_RATE_LIMIT = (
    "550 5.1.90 Your message can't be sent because you've reached your daily limit for message recipients."
)


def token_error_message(reason: str, token: str) -> str:
    if "." not in token:
        return "IDX14100: JWT is not well formed, there are no dots (.)."
    if "expired" in reason:
        return "Lifetime validation failed, the token is expired."
    if "audience" in reason:
        return "Access token validation failure. Invalid audience."
    return "Access token validation failure."
