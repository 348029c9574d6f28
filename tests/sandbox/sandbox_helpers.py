"""Helpers of the sandbox SMTP tests: the test tenant, tokens, messages, real SMTP clients.

The sandbox runs on the test's event loop; blocking clients (smtplib, swaks) run in a thread or a
subprocess so the loop keeps serving them. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import ipaddress
import smtplib
import ssl
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import AppRegistration, InboundConnector, Limits, Mailbox, Tenant

TENANT_ID = "5d2c8f0e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
SCANNER = "scanner@contoso.test"
ALICE = "alice@contoso.test"
BOB = "bob@fabrikam.test"
SHARED = "noreply@contoso.test"
INTERN = "intern@contoso.test"
OFF = "off@contoso.test"  # SMTP AUTH disabled on the mailbox
ON = "on@contoso.test"  # SMTP AUTH enabled on the mailbox, whatever the tenant says
EXTERNAL = "someone@example.net"
APP = "11111111-2222-3333-4444-555555555555"  # SMTP.SendAsApp, all mailboxes
SCOPED_APP = "22222222-3333-4444-5555-666666666666"  # SMTP.SendAsApp, scanner only
GRAPH_APP = "33333333-4444-5555-6666-777777777777"  # Mail.Send only
PUBLIC_APP = "44444444-5555-6666-7777-888888888888"  # delegated SMTP.Send
PASSWORD = "Scanner-Passw0rd!"
CERT_NAME = "relay.contoso.test"


def make_tenant(**changes: Any) -> Tenant:
    """The test tenant; ``limits`` may be a dict of Limits fields."""
    mailboxes = [
        Mailbox(address=SCANNER, password=PASSWORD, send_as=frozenset({SHARED})),
        Mailbox(address=ALICE, password="Alice-Passw0rd!"),
        Mailbox(address=BOB, password="Bob-Passw0rd!"),
        Mailbox(address=SHARED, shared=True, licensed=False),
        Mailbox(address=INTERN, licensed=False, password="Intern-Passw0rd!"),
        Mailbox(address=OFF, smtp_auth_disabled=True, password="Off-Passw0rd!"),
        Mailbox(address=ON, smtp_auth_disabled=False, password="On-Passw0rd!"),
    ]
    apps = [
        AppRegistration(client_id=APP, client_secret="s", permissions=frozenset({"SMTP.SendAsApp"})),
        AppRegistration(
            client_id=SCOPED_APP,
            client_secret="s",
            permissions=frozenset({"SMTP.SendAsApp"}),
            mailboxes=frozenset({SCANNER}),
        ),
        AppRegistration(client_id=GRAPH_APP, client_secret="s", permissions=frozenset({"Mail.Send"})),
        AppRegistration(client_id=PUBLIC_APP, public_client=True, permissions=frozenset({"SMTP.Send"})),
    ]
    limits = changes.pop("limits", {})
    base = Tenant(
        tenant_id=TENANT_ID,
        name="Contoso test",
        accepted_domains=("contoso.test", "fabrikam.test"),
        mailboxes={m.address: m for m in mailboxes},
        apps={a.client_id: a for a in apps},
        connectors=(
            InboundConnector(name="printers", sender_ip_ranges=(ipaddress.ip_network("198.51.100.7/32"),)),
            InboundConnector(name="relay cert", tls_sender_certificate_name=CERT_NAME),
        ),
        limits=Limits(**{"smtp_connections_per_mailbox": 3, **limits}),
        # The test domains publish SPF for the loopback peer, so Direct Send from them lands in the Inbox
        # (the sandbox's anti-spoofing is on, as in every tenant); tests of Junk Email change these.
        spf_records={
            "contoso.test": "v=spf1 ip4:127.0.0.1 include:spf.protection.outlook.com ~all",
            "fabrikam.test": "v=spf1 ip4:127.0.0.1 include:spf.protection.outlook.com ~all",
        },
    )
    return dataclasses.replace(base, **changes)


def client_tls(sandbox: Sandbox) -> ssl.SSLContext:
    """A client TLS context trusting the sandbox CA."""
    return sandbox.ctx.tls.client_context()


def app_token(sandbox: Sandbox, client_id: str = APP, **kwargs: Any) -> str:
    """A real app-only SMTP token signed by the sandbox's token issuer."""
    app = sandbox.ctx.tenant.apps[client_id]
    options: dict[str, Any] = {
        "audience": "https://outlook.office365.com",
        "roles": frozenset(app.permissions),
        "scopes": None,
        "upn": None,
        **kwargs,
    }
    return sandbox.ctx.issuer.issue(app=app, **options)


def xoauth2(user: str, token: str) -> str:
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()


def message(
    sender: str, to: str, subject: str = "Scan", body: str = "Scanned page attached.\n"
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{abs(hash((sender, to, subject)))}@test.contoso.test>"
    msg.set_content(body)
    return msg


async def in_thread(func: Callable[..., Any], *args: Any, timeout: float = 20) -> Any:
    """Run a blocking client call in a thread, bounded."""
    return await asyncio.wait_for(asyncio.to_thread(func, *args), timeout)


def smtplib_session(port: int, starttls: bool = True, ctx: ssl.SSLContext | None = None) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    client.ehlo("scanner.lan")
    if starttls:
        client.starttls(context=ctx)
        client.ehlo("scanner.lan")
    return client


async def swaks(*args: str, timeout: float = 30) -> tuple[int, str]:
    """Run swaks; returns (exit code, transcript)."""
    proc = await asyncio.create_subprocess_exec(
        "swaks",
        "--hide-informational",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode("utf-8", "replace")
