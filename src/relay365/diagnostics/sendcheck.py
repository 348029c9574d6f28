"""``doctor --send-test TO``: a tracked test message through the running relay, and where it landed.

The message carries a unique token in its Subject and Message-ID. It goes to the relay's first listener
(the relay must be running); the 250 reply names the queue id. With ``sandbox_url`` (a running
``relay365 sandbox``) the sandbox's admin API (``GET /_sandbox/messages``) is polled until a copy with
that Message-ID shows up, and each copy's mailbox, folder and endpoint is reported.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import re
import secrets
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx

from relay365.diagnostics.checks.result import CheckResult, failed, passed
from relay365.replies import summary
from relay365.settings import ListenerSettings, Settings

_QUEUED = re.compile(r"queued as (\S+)", re.IGNORECASE)
_ANY_ADDRESS = ("0.0.0.0", "::", "")


@dataclass(frozen=True, slots=True, kw_only=True)
class SendTestOptions:
    to: str
    mail_from: str | None = None  # default: the first transport's mailbox, else postmaster@hostname
    relay_host: str | None = None  # default: the first listener's address (loopback for 0.0.0.0)
    relay_port: int | None = None  # default: the first listener's port
    ca_file: Path | None = None  # verify the relay's certificate with this CA (else: not verified)
    user: str | None = None  # a device login, when the listener requires one
    password_env: str | None = None
    sandbox_url: str | None = None  # e.g. https://127.0.0.1:8443 (relay365 sandbox)
    sandbox_ca_file: Path | None = None
    timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class TestMessage:
    token: str
    message_id: str
    message: EmailMessage


def build_test_message(opts: SendTestOptions, mail_from: str, hostname: str) -> TestMessage:
    token = secrets.token_hex(8)
    message_id = f"<relay365-doctor-{token}@{hostname}>"
    msg = EmailMessage()
    msg["From"] = mail_from
    msg["To"] = opts.to
    msg["Subject"] = f"relay365 doctor test {token}"
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = message_id
    msg.set_content(
        f"This is a test message sent by 'relay365 doctor --send-test'.\nTracking token: {token}\n"
    )
    return TestMessage(token, message_id, msg)


def _default_sender(settings: Settings) -> str:
    for t in settings.transports:
        if t.m365.mailbox:
            return t.m365.mailbox
    for t in settings.transports:
        if t.m365.accepted_domains:
            return f"postmaster@{t.m365.accepted_domains[0]}"
    return f"postmaster@{settings.server.hostname}"


def _context(ca_file: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if ca_file is None:  # our own relay on the LAN: the listener certificate row checks the cert
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def submit(
    listener: ListenerSettings, opts: SendTestOptions, test: TestMessage, mail_from: str
) -> tuple[str, str]:
    """Send to the relay; returns (where, reply). Raises aiosmtplib/OS errors."""
    host = opts.relay_host or ("127.0.0.1" if listener.address in _ANY_ADDRESS else listener.address)
    port = opts.relay_port or listener.port
    password = os.environ.get(opts.password_env, "") if opts.password_env else None
    _errors, reply = await aiosmtplib.send(
        test.message,
        hostname=host,
        port=port,
        sender=mail_from,
        recipients=[opts.to],
        use_tls=listener.tls == "implicit",
        start_tls=listener.tls in ("starttls", "starttls-required"),
        tls_context=_context(opts.ca_file) if listener.tls != "none" else None,
        username=opts.user,
        password=password,
        timeout=min(opts.timeout_s, 30.0),
    )
    return f"{host}:{port}", reply


def _has_id(stored: dict[str, Any], message_id: str) -> bool:
    headers = stored.get("headers", [])
    return any(k.lower() == "message-id" and v.strip() == message_id for k, v in headers)


async def find_in_sandbox(opts: SendTestOptions, test: TestMessage) -> list[dict[str, Any]]:
    """Poll the sandbox admin API until copies with our Message-ID appear (or the timeout)."""
    assert opts.sandbox_url is not None
    url = opts.sandbox_url.rstrip("/") + "/_sandbox/messages"
    verify: ssl.SSLContext | bool = (
        ssl.create_default_context(cafile=str(opts.sandbox_ca_file)) if opts.sandbox_ca_file else True
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + opts.timeout_s
    async with httpx.AsyncClient(verify=verify, timeout=10.0, trust_env=False) as client:
        while True:
            response = await client.get(url)
            response.raise_for_status()
            found = [m for m in response.json().get("messages", []) if _has_id(m, test.message_id)]
            if found or loop.time() >= deadline:
                return found
            await asyncio.sleep(0.25)


async def send_test_checks(settings: Settings, opts: SendTestOptions) -> list[CheckResult]:
    name = f"Test message to {opts.to}"
    if not settings.listeners:
        return [failed(name, "the config has no [[listener]]", "Add a listener for devices")]
    if opts.user and not (opts.password_env and os.environ.get(opts.password_env)):
        fix = "Put the device password in an environment variable and name it with --send-password-env"
        return [failed(name, f"--send-user {opts.user} without a password", fix)]
    mail_from = opts.mail_from or _default_sender(settings)
    test = build_test_message(opts, mail_from, settings.server.hostname)
    try:
        where, reply = await submit(settings.listeners[0], opts, test, mail_from)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        line = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
        return [failed(name, f"refused: {line}", summary(line))]
    except aiosmtplib.SMTPResponseException as exc:
        line = f"{exc.code} {exc.message}"
        return [failed(name, f"refused: {line}", summary(line))]
    except (aiosmtplib.SMTPException, OSError) as exc:
        return [
            failed(
                name,
                f"cannot submit to the relay: {type(exc).__name__}: {exc}",
                "Start the relay ('relay365 serve --config ...') or give --relay-host/--relay-port",
            )
        ]
    match = _QUEUED.search(reply)
    queue_id = match.group(1) if match else "?"
    show = f"relay365 queue show {queue_id}" + (f" --config {settings.source}" if settings.source else "")
    results = [
        passed(
            name,
            f"accepted by the relay at {where} as queue id {queue_id} "
            f"(Subject token {test.token}, Message-ID {test.message_id})",
            f"Follow it: {show}",
        )
    ]
    if opts.sandbox_url is None:
        return results
    try:
        copies = await find_in_sandbox(opts, test)
    except (httpx.HTTPError, ValueError) as exc:
        results.append(failed("Test message delivery", f"sandbox admin API: {exc}", "Check --sandbox-url"))
        return results
    if not copies:
        results.append(
            failed(
                "Test message delivery",
                f"queue id {queue_id} not in the sandbox within {opts.timeout_s:g} s",
                f"See why it waits: {show} (and the 'Oldest deferred recipient' row)",
            )
        )
        return results
    landed = "; ".join(f"{c.get('mailbox')} / {c.get('folder')} via {c.get('endpoint')}" for c in copies)
    results.append(passed("Test message delivery", f"queue id {queue_id} landed in: {landed}"))
    return results
