"""Delivery status notifications (RFC 3464 multipart/report, RFC 3462 report type).

Sent from the null sender ``<>`` to the original envelope sender, never for a message that itself
came from ``<>`` (no bounce of a bounce). One DSN covers every recipient that failed in one attempt.
"""

from __future__ import annotations

import email.utils
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_ENHANCED = re.compile(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")
HEADER_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class Failure:
    rcpt: str
    reply: str  # the upstream's (or relay365's own) reply, e.g. "550 5.1.1 User unknown"
    expired: bool = False  # queue lifetime reached after transient failures


def status_of(reply: str, *, expired: bool = False) -> str:
    """RFC 3463 status for the DSN's Status field."""
    if expired:
        return "4.4.7"  # RFC 3463: delivery time expired
    m = _ENHANCED.match(reply.strip())
    if m:
        return m.group(1)
    code = reply.strip()[:1]
    return f"{code}.0.0" if code in ("4", "5") else "5.0.0"


def _one_line(text: str) -> str:
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())[:900]


def original_headers(body: bytes) -> bytes:
    """The header section of the original message (bounded), for text/rfc822-headers."""
    end = body.find(b"\r\n\r\n")
    section = body[: end + 2] if end >= 0 else body
    return section[:HEADER_LIMIT]


def build_dsn(
    *,
    hostname: str,
    queue_id: str,
    original_sender: str,
    arrival: float,
    failures: Sequence[Failure],
    headers: bytes,
    explain: Callable[[str], str | None] = lambda reply: None,
) -> bytes:
    boundary = f"relay365-{secrets.token_hex(12)}"
    date = email.utils.formatdate(localtime=False)
    text = [
        f"This is the mail system at host {hostname}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "It is attached below (headers only). The reasons:",
        "",
    ]
    for f in failures:
        text.append(f"<{f.rcpt}>: {_one_line(f.reply)}")
        if f.expired:
            text.append("    The message stayed in the queue longer than the queue lifetime.")
        hint = explain(f.reply)
        if hint:
            text.append(f"    {_one_line(hint)}")
        text.append("")
    per_rcpt = []
    for f in failures:
        per_rcpt.append(
            f"Final-Recipient: rfc822; {f.rcpt}\r\nAction: failed\r\n"
            f"Status: {status_of(f.reply, expired=f.expired)}\r\n"
            f"Diagnostic-Code: smtp; {_one_line(f.reply)}\r\n"
        )
    status = (
        f"Reporting-MTA: dns; {hostname}\r\nX-Relay365-Queue-ID: {queue_id}\r\n"
        f"Arrival-Date: {email.utils.formatdate(arrival, localtime=False)}\r\n\r\n" + "\r\n".join(per_rcpt)
    )
    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
        f"To: <{original_sender}>\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {date}\r\n"
        f"Message-ID: <{queue_id}.{secrets.token_hex(4)}@{hostname}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
        "\r\n"
        "This is a MIME-encapsulated message.\r\n\r\n"
    )
    parts = [
        f"--{boundary}\r\nContent-Description: Notification\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n" + "\r\n".join(text) + "\r\n",
        f"--{boundary}\r\nContent-Description: Delivery report\r\n"
        f"Content-Type: message/delivery-status\r\n\r\n{status}\r\n",
        f"--{boundary}\r\nContent-Description: Undelivered Message Headers\r\n"
        "Content-Type: text/rfc822-headers\r\n\r\n",
    ]
    tail = f"\r\n--{boundary}--\r\n"
    return (head + "".join(parts)).encode("utf-8") + headers + tail.encode("ascii")
