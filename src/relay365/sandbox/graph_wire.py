"""How Microsoft Graph talks on the wire: what every response carries, error bodies, request bodies.

- Every Graph response (success or error) carries ``request-id`` (Graph's id of the request, what an
  admin quotes in a support case), ``client-request-id`` (the client's own header echoed, or the
  request-id when the client sent none), ``Date`` and ``x-ms-ags-diagnostic`` (the serving data
  center). https://learn.microsoft.com/graph/best-practices-concept#reliability-and-support,
  https://learn.microsoft.com/azure/azure-monitor/reference/tables/microsoftgraphactivitylogs
  (ClientRequestId: "if no client request identifier is sent, the value will be equal to the
  operation identifier").
- Error bodies are ``{"error": {"code", "message", "innerError": {"date", "request-id",
  "client-request-id"}}}`` with the same ids as the headers (https://learn.microsoft.com/graph/errors).
- Request bodies are OData JSON: Graph matches property names and action parameters without regard
  to case, so ``{"Message": ..., "SaveToSentItems": false}`` (what msgraph-sdk sends) is the same
  request as ``{"message": ..., "saveToSentItems": false}``. :class:`ODataObject` reads them so.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Message, Scope, Send

from relay365.errors import Relay365Error

_STATE_KEY = "graph_ids"
# What Graph reports as the serving front end (the data center and role instance vary by request).
_DATA_CENTERS = ("West Europe", "North Europe", "West US 2", "East US")


@dataclass(frozen=True, slots=True)
class GraphIds:
    """The ids of one Graph request."""

    request_id: str
    client_request_id: str


def start_request(scope: Scope) -> GraphIds:
    """New ids for a Graph request (the client's ``client-request-id`` echoed), kept in its scope."""
    request_id = str(uuid.uuid4())
    client_id = request_id
    for name, value in scope.get("headers", ()):
        if name == b"client-request-id":
            client_id = value.decode("latin-1").strip()[:200] or request_id
    ids = GraphIds(request_id, client_id)
    scope.setdefault("state", {})[_STATE_KEY] = ids
    return ids


def request_ids(scope: Scope) -> GraphIds:
    """The ids :func:`start_request` gave this request (new ones if it was not called)."""
    found = scope.get("state", {}).get(_STATE_KEY)
    return found if isinstance(found, GraphIds) else start_request(scope)


def diagnostic_header() -> str:
    """``x-ms-ags-diagnostic`` as Graph sends it: the serving front end, as compact JSON."""
    info = {
        "DataCenter": _DATA_CENTERS[secrets.randbelow(len(_DATA_CENTERS))],
        "Slice": "E",
        "Ring": str(1 + secrets.randbelow(5)),
        "ScaleUnit": f"{secrets.randbelow(8):03d}",
        "RoleInstance": f"SB1PEPF{secrets.token_hex(4).upper()}",
    }
    return json.dumps({"ServerInfo": info}, separators=(",", ":"))


def http_date(epoch: float) -> str:
    """An RFC 9110 ``Date`` value (``Thu, 05 Nov 2026 10:51:20 GMT``)."""
    return format_datetime(datetime.fromtimestamp(epoch, UTC), usegmt=True)


def with_response_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    """``send`` that adds ``extra`` headers (those the response does not set itself) to the response."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", ()))
            present = {name.lower() for name, _ in headers}
            headers += [(name, value) for name, value in extra if name not in present]
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


def graph_headers(ids: GraphIds | None, now: float) -> list[tuple[bytes, bytes]]:
    """The headers of every sandbox HTTPS response: Date; for Graph also the ids and diagnostic."""
    headers = [(b"date", http_date(now).encode())]
    if ids is not None:
        headers += [
            (b"request-id", ids.request_id.encode()),
            (b"client-request-id", ids.client_request_id.encode("latin-1", "replace")),
            (b"x-ms-ags-diagnostic", diagnostic_header().encode()),
        ]
    return headers


class GraphError(Relay365Error):
    """A Graph error reply: status, ``error.code``, ``error.message`` and extra headers."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        super().__init__(f"{status} {code}: {message}")


def graph_error(
    status: int,
    code: str,
    message: str,
    *,
    ids: GraphIds,
    now: float,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """``{"error": {"code", "message", "innerError": {...}}}`` as Graph sends it."""
    body = {
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                "request-id": ids.request_id,
                "client-request-id": ids.client_request_id,
            },
        }
    }
    return JSONResponse(body, status_code=status, headers=headers or {})


class ODataObject(Mapping[str, Any]):
    """A JSON object whose property names match without regard to case, as OData reads them.

    Nested objects are ODataObjects too; ``keys()`` gives the names as the client spelled them. Two
    names that differ only in case are a bad request."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._items: dict[str, tuple[str, Any]] = {}
        for key, value in data.items():
            folded = key.casefold()
            if folded in self._items:
                raise GraphError(400, "BadRequest", f"The property '{key}' is given more than once.")
            self._items[folded] = (key, odata(value))

    def __getitem__(self, key: str) -> Any:
        return self._items[key.casefold()][1]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.casefold() in self._items

    def __iter__(self) -> Iterator[str]:
        return (original for original, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)


def odata(value: Any) -> Any:
    """A parsed JSON value with every object made an :class:`ODataObject`."""
    if isinstance(value, Mapping):
        return ODataObject(value)
    if isinstance(value, list):
        return [odata(v) for v in value]
    return value


def same_name(value: object, *names: str) -> bool:
    """An OData enum or type name compared without regard to case (``"File"`` is ``"file"``)."""
    return isinstance(value, str) and value.casefold() in {n.casefold() for n in names}


def parse_json(body: bytes) -> ODataObject:
    try:
        data = json.loads(body or b"null")
    except ValueError as exc:
        raise GraphError(400, "RequestBodyRead", f"Invalid JSON in the request body: {exc}") from exc
    if not isinstance(data, dict):
        raise GraphError(400, "RequestBodyRead", "The request body must be a JSON object.")
    return ODataObject(data)


def parse_mime(body: bytes) -> EmailMessage:
    """The MIME form: the whole RFC 5322 message, base64 encoded, as a ``text/plain`` body."""
    compact = b"".join(body.split())
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise GraphError(
            400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content."
        ) from exc
    if not raw.strip():
        raise GraphError(400, "ErrorMimeContentInvalid", "The MIME content is empty.")
    message = BytesParser(policy=policy.default).parsebytes(raw)
    if not isinstance(message, EmailMessage):  # pragma: no cover - policy.default guarantees it
        raise GraphError(400, "ErrorMimeContentInvalid", "The MIME content could not be parsed.")
    return message


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, or 413 if it exceeds ``limit`` (the rest is drained, not kept)."""
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total <= limit:
            chunks.append(chunk)
    if total > limit:
        raise GraphError(
            413,
            "RequestEntityTooLarge",
            f"The request body is {total} bytes; the maximum request size is {limit} bytes. "
            "Use an upload session for large attachments.",
        )
    return b"".join(chunks)
