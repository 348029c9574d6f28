"""A stored message taken apart for display: text, HTML, attachments (names, types and sizes only)."""

from __future__ import annotations

import email.parser
import email.policy
from dataclasses import dataclass, field
from email.message import EmailMessage

TEXT_LIMIT = 256 * 1024  # characters of text or HTML shown


@dataclass
class Parts:
    text: str = ""
    html: str = ""
    attachments: list[tuple[str, str, int]] = field(default_factory=list)  # (name, type, bytes)


def _content(part: EmailMessage) -> str:
    try:
        value = part.get_content()
    except (LookupError, ValueError):
        payload = part.get_payload(decode=True)
        value = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    return value[:TEXT_LIMIT] if isinstance(value, str) else ""


def split(content: bytes) -> Parts:
    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(content)
    assert isinstance(msg, EmailMessage)
    out = Parts()
    text = msg.get_body(preferencelist=("plain",))
    html = msg.get_body(preferencelist=("html",))
    if isinstance(text, EmailMessage):
        out.text = _content(text)
    if isinstance(html, EmailMessage):
        out.html = _content(html)
    for part in msg.iter_attachments():
        if isinstance(part, EmailMessage):
            payload = part.get_payload(decode=True)
            size = len(payload) if isinstance(payload, bytes) else 0
            out.attachments.append((part.get_filename() or "(no name)", part.get_content_type(), size))
    return out
