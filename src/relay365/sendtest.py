"""``relay365 send``: one test message to any SMTP server, with every reply reported."""

from __future__ import annotations

import email.utils
import os
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib

from relay365.errors import Relay365Error


class SendFailed(Relay365Error):
    """The test message was not accepted; the message carries the server's reply."""


@dataclass(frozen=True, slots=True)
class SendOptions:
    host: str
    port: int
    mail_from: str
    to: tuple[str, ...]
    subject: str
    body: str
    tls: str = "starttls"
    user: str | None = None
    password_env: str | None = None
    ca_file: Path | None = None
    verify: bool = True
    timeout: float = 30.0


def build_message(opts: SendOptions) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = opts.mail_from
    msg["To"] = ", ".join(opts.to)
    msg["Subject"] = opts.subject
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain="relay365.local")
    msg.set_content(opts.body)
    return msg


async def send_test(opts: SendOptions) -> str:
    password = None
    if opts.user:
        password = os.environ.get(opts.password_env or "", "") if opts.password_env else None
        if not password:
            raise SendFailed("--user needs --password-env naming a variable that holds the password")
    context = ssl.create_default_context(cafile=str(opts.ca_file) if opts.ca_file else None)
    if not opts.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        errors, reply = await aiosmtplib.send(
            build_message(opts),
            hostname=opts.host,
            port=opts.port,
            sender=opts.mail_from,
            recipients=list(opts.to),
            use_tls=opts.tls == "implicit",
            start_tls=opts.tls == "starttls",
            tls_context=context if opts.tls != "none" else None,
            username=opts.user,
            password=password,
            timeout=opts.timeout,
        )
    except aiosmtplib.SMTPRecipientsRefused as e:
        raise SendFailed(
            "all recipients refused: "
            + "; ".join(f"<{r.recipient}> {r.code} {r.message}" for r in e.recipients)
        ) from None
    except aiosmtplib.SMTPResponseException as e:
        raise SendFailed(f"{e.code} {e.message}") from None
    except (aiosmtplib.SMTPException, OSError) as e:
        raise SendFailed(f"{type(e).__name__}: {e}") from None
    refused = "; ".join(f"<{r}> {resp.code} {resp.message}" for r, resp in errors.items())
    return reply + (f" (refused: {refused})" if refused else "")
