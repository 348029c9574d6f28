"""Graph's other paths: the draft path, for messages over the ~4 MB request limit and for messages
whose To/Cc name someone outside this envelope; and the JSON ``sendMail`` path, the only form in
which Graph can send without a Sent Items copy (``saveToSentItems: false``; MIME sendMail and draft
send always keep one).

Large: the message is taken apart (subject, body, attachments), a draft is created with the envelope's
recipients, attachments under 3 MB are posted whole and larger ones go through an upload session in
chunks of at most 4 MB (https://learn.microsoft.com/graph/outlook-large-attachments), then the draft is
sent. Small but not header-faithful: the draft is created from the MIME bytes, its recipients are set
to the envelope with PATCH, then it is sent.
"""

from __future__ import annotations

import base64
import email.policy
import json
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any, Protocol

import httpx

SMALL_ATTACHMENT = 3 * 1024 * 1024  # Graph: attachments under 3 MB are posted in one request
CHUNK = 12 * 327_680  # 3.75 MiB: a multiple of 320 KiB, under Graph's 4 MB per request


def _people(addresses: list[str]) -> list[dict[str, Any]]:
    return [{"emailAddress": {"address": a}} for a in addresses]


def _recipients(to: list[str], cc: list[str], bcc: list[str]) -> dict[str, Any]:
    return {"toRecipients": _people(to), "ccRecipients": _people(cc), "bccRecipients": _people(bcc)}


class GraphRequests(Protocol):
    """What these paths need of the transport (``graph.GraphTransport``): its mailbox's URL and its
    authenticated, paced requests."""

    @property
    def mailbox_url(self) -> str:
        """``{graph_url}/users/{mailbox}``"""
        ...

    async def request(self, method: str, url: str, *, auth: bool = True, **kwargs: Any) -> httpx.Response: ...


# Graph takes at most 5 custom (X-) headers in internetMessageHeaders.
MAX_CUSTOM_HEADERS = 5


async def send_json(
    t: GraphRequests, body: bytes, *, to: list[str], cc: list[str], bcc: list[str], limit: int
) -> str | None:
    """JSON sendMail with ``saveToSentItems: false``; None when the request would exceed ``limit``
    (the caller then takes the draft path, which keeps a Sent Items copy). Not byte-faithful:
    Exchange rebuilds the message from subject, body, recipients, attachments and X- headers."""
    msg = BytesParser(policy=email.policy.default).parsebytes(body)
    assert isinstance(msg, EmailMessage)
    message = _draft(msg, to, cc, bcc)
    sender = msg.get("From")
    if sender is not None and sender.addresses:
        message["from"] = _people([sender.addresses[0].addr_spec])[0]
    custom = [
        {"name": name, "value": str(value)} for name, value in msg.items() if name.lower().startswith("x-")
    ]
    if custom:
        message["internetMessageHeaders"] = custom[:MAX_CUSTOM_HEADERS]
    attachments = []
    for part in msg.iter_attachments():
        data = part.get_content()
        raw = data if isinstance(data, bytes) else str(data).encode("utf-8")
        attachment: dict[str, Any] = {
            "@odata.type": "#microsoft.graph.fileAttachment",
            "name": part.get_filename() or "attachment",
            "contentType": part.get_content_type(),
            "contentBytes": base64.b64encode(raw).decode("ascii"),
        }
        if part.get_content_disposition() == "inline" and part["Content-ID"]:
            attachment["isInline"] = True
            attachment["contentId"] = str(part["Content-ID"]).strip("<>")
        attachments.append(attachment)
    if attachments:
        message["attachments"] = attachments
    payload = json.dumps({"message": message, "saveToSentItems": False}).encode("utf-8")
    if len(payload) > limit:
        return None
    await t.request(
        "POST", f"{t.mailbox_url}/sendMail", content=payload, headers={"Content-Type": "application/json"}
    )
    return "202 Accepted (Graph sendMail, no Sent Items copy)"


async def send_via_draft(
    t: GraphRequests, body: bytes, *, to: list[str], cc: list[str], bcc: list[str], small: bool
) -> str:
    base = f"{t.mailbox_url}/messages"
    if small:
        created = await t.request(
            "POST", base, content=base64.b64encode(body), headers={"Content-Type": "text/plain"}
        )
        mid = str(created.json()["id"])
        await t.request("PATCH", f"{base}/{mid}", json=_recipients(to, cc, bcc))
    else:
        msg = BytesParser(policy=email.policy.default).parsebytes(body)
        assert isinstance(msg, EmailMessage)
        created = await t.request("POST", base, json=_draft(msg, to, cc, bcc))
        mid = str(created.json()["id"])
        for part in msg.iter_attachments():
            await _attach(t, f"{base}/{mid}", part)
    await t.request("POST", f"{base}/{mid}/send")
    return "202 Accepted (Graph draft send)"


def _draft(msg: EmailMessage, to: list[str], cc: list[str], bcc: list[str]) -> dict[str, Any]:
    text = msg.get_body(preferencelist=("html", "plain"))
    content = text.get_content() if text is not None else ""
    kind = "html" if text is not None and text.get_content_subtype() == "html" else "text"
    draft: dict[str, Any] = {
        "subject": str(msg.get("Subject", "")),
        "body": {"contentType": kind, "content": content},
        **_recipients(to, cc, bcc),
    }
    reply_to = msg.get("Reply-To")
    if reply_to:
        draft["replyTo"] = _people([a.addr_spec for a in reply_to.addresses])
    return draft


async def _attach(t: GraphRequests, url: str, part: EmailMessage) -> None:
    data = part.get_content()
    raw = data if isinstance(data, bytes) else str(data).encode("utf-8")
    name = part.get_filename() or "attachment"
    ctype = part.get_content_type()
    if len(raw) < SMALL_ATTACHMENT:
        await t.request(
            "POST",
            f"{url}/attachments",
            json={
                "@odata.type": "#microsoft.graph.fileAttachment",
                "name": name,
                "contentType": ctype,
                "contentBytes": base64.b64encode(raw).decode("ascii"),
            },
        )
        return
    session = await t.request(
        "POST",
        f"{url}/attachments/createUploadSession",
        json={
            "AttachmentItem": {
                "attachmentType": "file",
                "name": name,
                "size": len(raw),
                "contentType": ctype,
            },
        },
    )
    upload_url = str(session.json()["uploadUrl"])
    for start in range(0, len(raw), CHUNK):
        chunk = raw[start : start + CHUNK]
        end = start + len(chunk) - 1
        # The upload URL carries its own token: no Authorization header (Graph rejects one).
        await t.request(
            "PUT",
            upload_url,
            auth=False,
            content=chunk,
            headers={
                "Content-Range": f"bytes {start}-{end}/{len(raw)}",
                "Content-Length": str(len(chunk)),
                "Content-Type": "application/octet-stream",
            },
        )
