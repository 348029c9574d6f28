"""Non-delivery reports as Exchange Online writes them into the sender's mailbox.

Used where Exchange accepts a submission and refuses it later (Graph ``sendMail`` returns 202 before
transport sees the message): the sender learns of the failure only from this NDR. The form follows
Microsoft's description of an NDR (https://learn.microsoft.com/troubleshoot/exchange/email-delivery/
ndr/non-delivery-reports-in-exchange-online, "What's included in an NDR?"): a readable cause and fix,
the diagnostic information for administrators (the SMTP response with its enhanced status code), and
an RFC 3464 ``message/delivery-status`` part with the original headers.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime

_STATUS = re.compile(r"^\d{3} ([245]\.\d{1,3}\.\d{1,3})\b")


def non_delivery_report(
    *,
    original: EmailMessage,
    recipients: Sequence[str],
    reply: str,
    reporting_host: str,
    now: float,
) -> bytes:
    """An NDR for ``original`` refused with ``reply`` (``"550 5.1.90 ..."``) for ``recipients``."""
    status = _STATUS.match(reply)
    enhanced = status.group(1) if status else "5.0.0"
    date = format_datetime(datetime.fromtimestamp(now, UTC))
    boundary = f"NDR-{secrets.token_hex(12)}"
    text = "\r\n".join(
        [
            "Your message to " + ", ".join(recipients) + " couldn't be delivered.",
            "",
            "Diagnostic information for administrators:",
            f"Generating server: {reporting_host}",
            "",
            *(f"{r}\r\nRemote server returned '{reply}'\r\n" for r in recipients),
        ]
    )
    per_recipient = "".join(
        f"Final-Recipient: rfc822;{r}\r\nAction: failed\r\nStatus: {enhanced}\r\n"
        f"Diagnostic-Code: smtp;{reply}\r\n\r\n"
        for r in recipients
    )
    head = (
        f"From: Microsoft Outlook <MicrosoftExchange329e71ec88ae4615bbc36ab6ce41109e@{reporting_host}>\r\n"
        f"To: {original.get('From', '')}\r\n"
        f"Date: {date}\r\n"
        f"Subject: Undeliverable: {original.get('Subject', '')}\r\n"
        f"Message-ID: <{secrets.token_hex(12)}@{reporting_host}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "X-MS-Exchange-Message-Is-Ndr:\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n\r\n'
    )
    original_head = original.as_bytes(policy=policy.SMTP).split(b"\r\n\r\n", 1)[0]
    parts = (
        f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
        f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns;{reporting_host}\r\nArrival-Date: {date}\r\n\r\n{per_recipient}"
        f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    )
    return (head + parts).encode("utf-8") + original_head + f"\r\n\r\n--{boundary}--\r\n".encode()
