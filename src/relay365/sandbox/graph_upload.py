"""Drafts, attachments and upload sessions: Graph's path for messages over the 4 MB request limit.

https://learn.microsoft.com/graph/outlook-large-attachments ::

    POST /v1.0/users/{id}/messages                                   draft (JSON or MIME), 201
    POST /v1.0/users/{id}/messages/{mid}/attachments                 small file attachment, 201
    POST /v1.0/users/{id}/messages/{mid}/attachments/createUploadSession
         {"AttachmentItem": {"attachmentType": "file", "name", "size"}}   201, uploadUrl
    PUT  <uploadUrl>   Content-Range: bytes a-b/size, each chunk <= 4 MB, no Authorization header
         (the URL carries its own token): 200 {"nextExpectedRanges": ["n"]}, the last one 201
    DELETE <uploadUrl> cancels the session, 204
    POST /v1.0/users/{id}/messages/{mid}/send                        202

Creating drafts and attachments needs ``Mail.ReadWrite``; sending needs ``Mail.Send``. Drafts
live in memory; a sent draft becomes a stored message (and a Sent Items copy) like sendMail.
An upload session needs an attachment of at least 3 MB (smaller ones are posted directly).
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay365.sandbox.graph_message import (
    Caller,
    Handler,
    add_file_attachment,
    attach_bytes,
    message_from_json,
)
from relay365.sandbox.graph_wire import GraphError, parse_json, parse_mime, read_limited, same_name

if TYPE_CHECKING:
    from relay365.sandbox.context import SandboxContext


class DraftHost(Protocol):
    """What the draft path needs of the Graph endpoint (``graph.GraphEndpoint``)."""

    ctx: SandboxContext

    async def call(self, request: Request, permission: str, handler: Handler) -> Response: ...

    def fail(self, request: Request, err: GraphError) -> Response: ...

    def deliver(self, caller: Caller, message: EmailMessage, *, save_to_sent_items: bool) -> None: ...


MIN_UPLOAD_SESSION_SIZE = 3 * 1024 * 1024
MAX_ATTACHMENT_SIZE = 150 * 1024 * 1024
UPLOAD_SESSION_LIFETIME = 6 * 3600.0
_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
_UPLOAD_PATH = re.compile(r"^users\('([^']+)'\)/messages\('([^']+)'\)/AttachmentSessions\('([^']+)'\)$")


@dataclass
class _Draft:
    id: str
    mailbox: str
    app_id: str
    message: EmailMessage
    created_at: str
    uploaded: list[tuple[str, str, bytes, bool]] = field(default_factory=list)


@dataclass
class _Session:
    id: str
    draft_id: str
    mailbox: str
    name: str
    content_type: str
    size: int
    inline: bool
    auth_token: str
    expires_at: float
    received: bytearray = field(default_factory=bytearray)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Drafts:
    """Draft messages and their upload sessions, per mailbox."""

    def __init__(self, graph: DraftHost) -> None:
        self._graph = graph
        self._drafts: dict[str, _Draft] = {}
        self._sessions: dict[str, _Session] = {}

    def routes(self, base: str) -> list[Route]:
        g = self._graph

        async def create(request: Request) -> Response:
            return await g.call(request, "Mail.ReadWrite", self._create_draft)

        async def attach(request: Request) -> Response:
            return await g.call(request, "Mail.ReadWrite", self._add_attachment)

        async def session(request: Request) -> Response:
            return await g.call(request, "Mail.ReadWrite", self._create_session)

        async def send(request: Request) -> Response:
            return await g.call(request, "Mail.Send", self._send)

        async def update(request: Request) -> Response:
            return await g.call(request, "Mail.ReadWrite", self._update_draft)

        return [
            Route(f"{base}/messages", create, methods=["POST"]),
            Route(f"{base}/messages/{{mid}}", update, methods=["PATCH"]),
            Route(f"{base}/messages/{{mid}}/attachments", attach, methods=["POST"]),
            Route(f"{base}/messages/{{mid}}/attachments/createUploadSession", session, methods=["POST"]),
            Route(f"{base}/messages/{{mid}}/send", send, methods=["POST"]),
        ]

    def upload_routes(self) -> list[Route]:
        return [Route("/api/gv1.0/{rest:path}", self._upload, methods=["PUT", "DELETE"])]

    # -- drafts --------------------------------------------------------------------------------

    def _draft(self, request: Request, caller: Caller) -> _Draft:
        mid = request.path_params["mid"]
        draft = self._drafts.get(mid)
        if draft is None or draft.mailbox != caller.mailbox.address.lower():
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return draft

    async def _update_draft(self, request: Request, caller: Caller, body: bytes) -> Response:
        """PATCH a draft (https://learn.microsoft.com/graph/api/message-update): recipients, subject."""
        draft = self._draft(request, caller)
        changes = parse_json(body)
        headers = {"toRecipients": "To", "ccRecipients": "Cc", "bccRecipients": "Bcc"}
        for key, header in headers.items():
            if key not in changes:
                continue
            people = changes[key]
            if not isinstance(people, list):
                raise GraphError(400, "ErrorInvalidRequest", f"'{key}' must be a collection.")
            addresses = [
                str(p.get("emailAddress", {}).get("address", "")) for p in people if isinstance(p, Mapping)
            ]
            del draft.message[header]
            if any(addresses):
                draft.message[header] = ", ".join(a for a in addresses if a)
        if isinstance(changes.get("subject"), str):
            del draft.message["Subject"]
            draft.message["Subject"] = changes["subject"]
        return JSONResponse(self._resource(draft), status_code=200)

    async def _create_draft(self, request: Request, caller: Caller, body: bytes) -> Response:

        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "text/plain":
            message = parse_mime(body)
        else:
            message = message_from_json(parse_json(body), mailbox=caller.mailbox)
        now = self._graph.ctx.clock.now()
        draft = _Draft(
            id=secrets.token_urlsafe(24),
            mailbox=caller.mailbox.address.lower(),
            app_id=caller.claims.app_id,
            message=message,
            created_at=_iso(now),
        )
        self._drafts[draft.id] = draft
        return JSONResponse(self._resource(draft), status_code=201)

    def _resource(self, draft: _Draft) -> dict[str, Any]:
        return {
            "@odata.context": (
                f"https://graph.microsoft.com/v1.0/$metadata#users('{draft.mailbox}')/messages/$entity"
            ),
            "id": draft.id,
            "createdDateTime": draft.created_at,
            "lastModifiedDateTime": draft.created_at,
            "subject": str(draft.message.get("Subject", "")),
            "isDraft": True,
            "hasAttachments": bool(draft.uploaded) or draft.message.is_multipart(),
        }

    async def _add_attachment(self, request: Request, caller: Caller, body: bytes) -> Response:
        draft = self._draft(request, caller)
        data = parse_json(body)
        add_file_attachment(draft.message, data)
        attachment_id = secrets.token_urlsafe(16)
        return JSONResponse(
            {"id": attachment_id, "name": data.get("name"), "isInline": bool(data.get("isInline"))},
            status_code=201,
        )

    async def _send(self, request: Request, caller: Caller, body: bytes) -> Response:
        draft = self._draft(request, caller)
        message = draft.message
        for name, content_type, data, inline in draft.uploaded:
            attach_bytes(message, data, name=name, content_type=content_type, inline=inline)
        self._graph.deliver(caller, message, save_to_sent_items=True)
        del self._drafts[draft.id]
        for sid in [s.id for s in self._sessions.values() if s.draft_id == draft.id]:
            del self._sessions[sid]
        return Response(status_code=202)

    # -- upload sessions -----------------------------------------------------------------------

    async def _create_session(self, request: Request, caller: Caller, body: bytes) -> Response:
        draft = self._draft(request, caller)
        item = parse_json(body).get("AttachmentItem")
        if not isinstance(item, Mapping) or not same_name(item.get("attachmentType", "file"), "file"):
            raise GraphError(
                400, "ErrorInvalidRequest", "AttachmentItem with attachmentType 'file' is required."
            )
        size = item.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise GraphError(400, "ErrorInvalidRequest", "AttachmentItem.size must be a positive number.")
        if size < MIN_UPLOAD_SESSION_SIZE:
            raise GraphError(
                400,
                "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
                "Attachment size must be greater than the minimum size.",
            )
        if size > MAX_ATTACHMENT_SIZE:
            raise GraphError(
                400, "ErrorAttachmentSizeExceeded", "The attachment exceeds the maximum size of 150 MB."
            )
        now = self._graph.ctx.clock.now()
        session = _Session(
            id=secrets.token_urlsafe(24),
            draft_id=draft.id,
            mailbox=draft.mailbox,
            name=str(item.get("name") or "attachment"),
            content_type=str(item.get("contentType") or "application/octet-stream"),
            size=size,
            inline=bool(item.get("isInline", False)),
            auth_token=secrets.token_urlsafe(32),
            expires_at=now + UPLOAD_SESSION_LIFETIME,
        )
        self._sessions[session.id] = session
        base = f"{request.url.scheme}://{request.url.netloc}"
        url = (
            f"{base}/api/gv1.0/users('{draft.mailbox}')/messages('{draft.id}')"
            f"/AttachmentSessions('{session.id}')?authtoken={session.auth_token}"
        )
        return JSONResponse(
            {
                "@odata.context": (
                    "https://graph.microsoft.com/v1.0/$metadata#microsoft.graph.uploadSession"
                ),
                "uploadUrl": url,
                "expirationDateTime": _iso(session.expires_at),
                "nextExpectedRanges": ["0-"],
            },
            status_code=201,
        )

    async def _upload(self, request: Request) -> Response:
        try:
            return await self._upload_chunk(request)
        except GraphError as err:
            return self._graph.fail(request, err)

    def _session(self, request: Request) -> _Session:
        match = _UPLOAD_PATH.match(request.path_params["rest"])
        session = self._sessions.get(match.group(3)) if match else None
        token = request.query_params.get("authtoken", "")
        if session is None or not hmac.compare_digest(token.encode(), session.auth_token.encode()):
            raise GraphError(404, "ErrorItemNotFound", "The upload session was not found or has expired.")
        if self._graph.ctx.clock.now() > session.expires_at:
            del self._sessions[session.id]
            raise GraphError(404, "ErrorItemNotFound", "The upload session was not found or has expired.")
        return session

    async def _upload_chunk(self, request: Request) -> Response:
        session = self._session(request)
        if request.method == "DELETE":
            del self._sessions[session.id]
            return Response(status_code=204)
        limit = self._graph.ctx.tenant.limits.graph_max_request_bytes
        body = await read_limited(request, limit)
        match = _RANGE.match(request.headers.get("content-range", "").strip())
        if match is None:
            raise GraphError(
                400, "ErrorInvalidRequest", "A Content-Range header 'bytes start-end/size' is required."
            )
        start, end, total = (int(g) for g in match.groups())
        received = len(session.received)
        if total != session.size or start != received or end < start or end >= total:
            raise GraphError(
                416,
                "ErrorInvalidRange",
                f"The Content-Range {start}-{end}/{total} does not match the next expected range "
                f"{received}- of {session.size} bytes.",
            )
        if len(body) != end - start + 1:
            raise GraphError(
                400,
                "ErrorInvalidRequest",
                f"The body has {len(body)} bytes but Content-Range announces {end - start + 1}.",
            )
        session.received.extend(body)
        if len(session.received) < session.size:
            return JSONResponse(
                {
                    "@odata.context": (
                        "https://outlook.office.com/api/v2.0/$metadata#Users/Messages/"
                        "AttachmentSessions/$entity"
                    ),
                    "expirationDateTime": _iso(session.expires_at),
                    "nextExpectedRanges": [str(len(session.received))],
                }
            )
        draft = self._drafts.get(session.draft_id)
        del self._sessions[session.id]
        if draft is None:
            raise GraphError(404, "ErrorItemNotFound", "The draft message no longer exists.")
        attachment_id = secrets.token_urlsafe(16)
        draft.uploaded.append((session.name, session.content_type, bytes(session.received), session.inline))
        base = f"{request.url.scheme}://{request.url.netloc}"
        location = (
            f"{base}/api/v2.0/Users('{draft.mailbox}')/Messages('{draft.id}')/Attachments('{attachment_id}')"
        )
        return Response(status_code=201, headers={"Location": location})
