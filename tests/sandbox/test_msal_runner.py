"""End to end through the real runner: msal tokens from the sandbox, then SMTP XOAUTH2 and Graph.

This is the configuration the relay's transports use against the sandbox (see Clients in
test_msal_sandbox.py): msal with ``instance_discovery=False`` and its own requests session
trusting the sandbox CA; httpx and aiosmtplib with an SSL context built from ``ca_path``.
"""

from __future__ import annotations

import asyncio
import ssl
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import msal
import requests

from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import example_tenant

RELAY_APP = "11111111-2222-3333-4444-555555555555"  # example tenant: secret, scoped to scanner@
RELAY_SECRET = "sandbox-secret-relay365"
DEVICE_APP = "66666666-7777-8888-9999-000000000000"  # example tenant: public client, SMTP.Send
SCANNER = "scanner@contoso.test"
SCANNER_PASSWORD = "Scanner-Passw0rd!"
ALICE = "alice@contoso.test"


def msal_app(sandbox: Sandbox, client_id: str, credential: Any = None) -> Any:
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE must not replace the sandbox CA
    session.verify = str(sandbox.ca_path)
    if credential is None:
        return msal.PublicClientApplication(
            client_id, authority=sandbox.authority, instance_discovery=False, http_client=session
        )
    return msal.ConfidentialClientApplication(
        client_id,
        authority=sandbox.authority,
        client_credential=credential,
        instance_discovery=False,
        azure_region=False,
        http_client=session,
    )


def mail(sender: str, subject: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ALICE
    message["Subject"] = subject
    message.set_content("end to end")
    return message


async def submit(sandbox: Sandbox, user: str, token: str, subject: str) -> None:
    context = ssl.create_default_context(cafile=str(sandbox.ca_path))
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=sandbox.submission_port,
        start_tls=True,
        tls_context=context,
        timeout=20,
    )
    async with smtp:
        await smtp.auth_xoauth2(user, token)
        await smtp.send_message(mail(user, subject))


async def test_app_only_token_for_smtp_and_graph(tmp_path: Path) -> None:
    async with Sandbox(example_tenant(), state_dir=tmp_path) as sandbox:
        # msal's constructor already fetches the OIDC discovery document: never on the loop.
        app = await asyncio.to_thread(msal_app, sandbox, RELAY_APP, RELAY_SECRET)
        try:
            smtp_token = await asyncio.to_thread(
                app.acquire_token_for_client, scopes=["https://outlook.office365.com/.default"]
            )
            graph_token = await asyncio.to_thread(
                app.acquire_token_for_client, scopes=["https://graph.microsoft.com/.default"]
            )
        finally:
            app.http_client.close()
        assert "access_token" in smtp_token, smtp_token
        await submit(sandbox, SCANNER, smtp_token["access_token"], "via XOAUTH2")
        context = ssl.create_default_context(cafile=str(sandbox.ca_path))
        async with httpx.AsyncClient(verify=context, timeout=20) as client:
            reply = await client.post(
                f"{sandbox.graph_url}/users/{SCANNER}/sendMail",
                headers={"Authorization": f"Bearer {graph_token['access_token']}"},
                json={
                    "message": {
                        "subject": "via Graph",
                        "body": {"contentType": "Text", "content": "end to end"},
                        "toRecipients": [{"emailAddress": {"address": ALICE}}],
                    }
                },
            )
        assert reply.status_code == 202, reply.text
        inbox = sandbox.ctx.store.list(mailbox=ALICE, folder="Inbox")
        assert sorted((m.subject, m.endpoint) for m in inbox) == [
            ("via Graph", "graph"),
            ("via XOAUTH2", "submission"),
        ]
        assert len(sandbox.ctx.store.list(mailbox=SCANNER, folder="SentItems")) == 2
        assert sandbox.ctx.store.rejections() == {}


async def test_device_code_refresh_token_for_smtp(tmp_path: Path) -> None:
    scopes = ["https://outlook.office.com/SMTP.Send"]
    async with Sandbox(example_tenant(), state_dir=tmp_path) as sandbox:
        app = await asyncio.to_thread(msal_app, sandbox, DEVICE_APP)
        try:
            flow = await asyncio.to_thread(app.initiate_device_flow, scopes=scopes)
            context = ssl.create_default_context(cafile=str(sandbox.ca_path))
            async with httpx.AsyncClient(verify=context, timeout=20) as client:
                approved = await client.post(
                    f"{sandbox.base_url}/_sandbox/devicecode/approve",
                    json={
                        "user_code": flow["user_code"],
                        "address": SCANNER,
                        "password": SCANNER_PASSWORD,
                    },
                )
            assert approved.status_code == 200, approved.text
            first = await asyncio.to_thread(app.acquire_token_by_device_flow, flow)
            assert "refresh_token" in first, first
            # What the relay stores is the refresh token; later it redeems it for a new token.
            later = await asyncio.to_thread(
                app.acquire_token_by_refresh_token, first["refresh_token"], scopes
            )
        finally:
            app.http_client.close()
        assert "access_token" in later, later
        await submit(sandbox, SCANNER, later["access_token"], "delegated")
        inbox = sandbox.ctx.store.list(mailbox=ALICE, folder="Inbox")
        assert [m.subject for m in inbox] == ["delegated"]
        assert inbox[0].endpoint == "submission"
        assert inbox[0].authenticated_as == f"{SCANNER} (XOAUTH2 app {DEVICE_APP})"
