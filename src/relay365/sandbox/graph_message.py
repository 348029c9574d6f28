"""The Graph message model of the sandbox: who calls (``Caller``), and a Graph ``message`` resource (JSON,
file attachments in base64) turned into the RFC 5322 message Exchange would submit. Shared by
``sendMail`` (graph.py) and the draft / upload-session path (graph_upload.py)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from relay365.sandbox.graph_wire import GraphError, same_name
from relay365.sandbox.tokens import AccessClaims

if TYPE_CHECKING:
    from relay365.sandbox.tenant import Mailbox


@dataclass(frozen=True)
class Caller:
    """An authenticated Graph request: the token's claims and the mailbox in the URL."""

    claims: AccessClaims
    mailbox: Mailbox

    @property
    def identity(self) -> str:
        """What the store records as ``authenticated_as`` (same shape as the SMTP endpoints')."""
        if self.claims.upn is None:
            return f"{self.mailbox.address} (Graph app {self.claims.app_id})"
        return f"{self.claims.upn} (Graph delegated, app {self.claims.app_id})"

    def has(self, permission: str) -> bool:
        return permission in (self.claims.roles if self.claims.app_only else self.claims.scopes)


Handler = Callable[[Request, Caller, bytes], Awaitable[Response]]


def format_address(address: str, name: str | None) -> str:
    from email.headerregistry import Address

    return str(Address(display_name=name or "", addr_spec=address))


def _recipients(raw: Mapping[str, Any], key: str) -> list[str]:
    value = raw.get(key) or []
    if not isinstance(value, list):
        raise GraphError(400, "ErrorInvalidRecipients", f"'{key}' must be a collection.")
    result: list[str] = []
    for entry in value:
        email_address = entry.get("emailAddress") if isinstance(entry, Mapping) else None
        address = email_address.get("address") if isinstance(email_address, Mapping) else None
        if not isinstance(address, str) or "@" not in address:
            raise GraphError(
                400,
                "ErrorInvalidRecipients",
                f"At least one recipient is not valid., Recipient '{address}' is not resolved. "
                "All recipients must be resolved before a message can be submitted.",
            )
        name = email_address.get("name") if isinstance(email_address, Mapping) else None
        result.append(format_address(address, name if isinstance(name, str) else None))
    return result


def message_from_json(raw: Mapping[str, Any], *, mailbox: Mailbox) -> EmailMessage:
    """A Graph ``message`` resource as an RFC 5322 message (Bcc kept as a header for now)."""
    message = EmailMessage()
    sender = raw.get("from")
    if sender is not None:
        entries = _recipients({"from": [sender]}, "from")
        message["From"] = entries[0]
    for key, header in (
        ("toRecipients", "To"),
        ("ccRecipients", "Cc"),
        ("bccRecipients", "Bcc"),
        ("replyTo", "Reply-To"),
    ):
        entries = _recipients(raw, key)
        if entries:
            message[header] = ", ".join(entries)
    message["Subject"] = str(raw.get("subject") or "")
    for header in raw.get("internetMessageHeaders") or []:
        name = str(header.get("name", "")) if isinstance(header, Mapping) else ""
        if not name.lower().startswith("x-"):
            raise GraphError(
                400,
                "InvalidInternetMessageHeader",
                f"The internet message header name '{name}' should start with 'x-' or 'X-'.",
            )
        message[name] = str(header.get("value", ""))
    body = raw.get("body") or {}
    content = str(body.get("content", "")) if isinstance(body, Mapping) else ""
    kind = str(body.get("contentType", "text")).lower() if isinstance(body, Mapping) else "text"
    message.set_content(content, subtype="html" if kind == "html" else "plain")
    for attachment in raw.get("attachments") or []:
        add_file_attachment(message, attachment)
    return message


def add_file_attachment(message: EmailMessage, attachment: object) -> None:
    """Add one ``#microsoft.graph.fileAttachment`` (``contentBytes`` base64) to ``message``."""
    if not isinstance(attachment, Mapping) or not same_name(
        attachment.get("@odata.type"), "#microsoft.graph.fileAttachment", "microsoft.graph.fileAttachment"
    ):
        raise GraphError(
            400, "ErrorInvalidRequest", "Only #microsoft.graph.fileAttachment is supported here."
        )
    try:
        data = base64.b64decode(str(attachment.get("contentBytes", "")), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise GraphError(
            400, "ErrorInvalidRequest", "The attachment contentBytes is not valid base64."
        ) from exc
    attach_bytes(
        message,
        data,
        name=str(attachment.get("name") or "attachment"),
        content_type=str(attachment.get("contentType") or "application/octet-stream"),
        inline=bool(attachment.get("isInline", False)),
        content_id=attachment.get("contentId"),
    )


def attach_bytes(
    message: EmailMessage,
    data: bytes,
    *,
    name: str,
    content_type: str,
    inline: bool = False,
    content_id: object = None,
) -> None:
    maintype, _, subtype = content_type.partition("/")
    if not maintype or not subtype:
        maintype, subtype = "application", "octet-stream"
    message.add_attachment(
        data,
        maintype=maintype,
        subtype=subtype,
        filename=name,
        disposition="inline" if inline else "attachment",
        cid=f"<{content_id}>" if inline and isinstance(content_id, str) else None,
    )
