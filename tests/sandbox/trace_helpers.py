"""Helpers of the mail flow and message trace tests: a tenant with trace apps, tokens, clients."""

from __future__ import annotations

import dataclasses
import ssl
from typing import Any

import aiosmtplib
import httpx

from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import AppRegistration, Tenant
from tests.sandbox.sandbox_helpers import make_tenant

TRACE_APP = "99999999-8888-4777-8666-555555555555"  # ExchangeMessageTrace.Read.All
MAIL_APP = "77777777-6666-4555-8444-333333333333"  # Mail.Send only: no trace permission
SECRET = "trace-app-secret"
TRACES = "/admin/exchange/tracing/messageTraces"


def trace_tenant(**changes: Any) -> Tenant:
    """The sandbox test tenant plus an app that may read the message trace and one that may not."""
    base = make_tenant()
    apps = dict(base.apps)
    apps[TRACE_APP] = AppRegistration(
        client_id=TRACE_APP, client_secret=SECRET, permissions=frozenset({"ExchangeMessageTrace.Read.All"})
    )
    apps[MAIL_APP] = AppRegistration(
        client_id=MAIL_APP, client_secret=SECRET, permissions=frozenset({"Mail.Send"})
    )
    return dataclasses.replace(base, apps=apps, **changes)


def tls(sandbox: Sandbox) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(sandbox.ca_path))


async def graph_token(sandbox: Sandbox, client_id: str = TRACE_APP) -> str:
    """An app-only Graph token from the sandbox's token endpoint (client credentials over HTTPS)."""
    async with httpx.AsyncClient(verify=tls(sandbox), timeout=20) as http:
        response = await http.post(
            f"{sandbox.authority}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_secret": SECRET,
                "scope": "https://graph.microsoft.com/.default",
            },
        )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


async def direct_send(sandbox: Sandbox, mail_from: str, rcpts: list[str], content: bytes) -> str:
    """One message over the MX endpoint; returns the 250 reply text."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sandbox.mx_port, start_tls=False, timeout=10)
    await client.connect()
    try:
        errors, reply = await client.sendmail(mail_from, rcpts, content)
        assert errors == {}
        return reply
    finally:
        await client.quit()


def trace_rows(sandbox: Sandbox) -> list[dict[str, Any]]:
    """Every trace record as Graph would show it now."""
    now = sandbox.ctx.clock.now()
    return [r.to_graph(now) for r in sandbox.ctx.trace.records()]
