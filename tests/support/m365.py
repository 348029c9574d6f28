"""Relay settings that route into a running sandbox tenant: its registered app and the transport
tables for SMTP AUTH submission, Direct Send and a connector (the ``sandbox`` fixture of tests/m365
starts the tenant); ``send`` a message into the relay, ``wait_until`` the sandbox shows it (these two:
``from tests.support.m365 import send, wait_until``; tests.support's own ``wait_until`` awaits)."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay365.sandbox.runner import Sandbox
from relay365.service.relay import Relay

APP_ID = "11111111-2222-3333-4444-555555555555"
APP_SECRET = "sandbox-secret-relay365"
SECRET_ENV = "RELAY365_TEST_APP_SECRET"


def oauth(sb: Sandbox, *, client_id: str = APP_ID) -> dict[str, Any]:
    return {
        "tenant": sb.ctx.tenant.tenant_id,
        "client_id": client_id,
        "client_secret_env": SECRET_ENV,
        "authority": sb.base_url,
        "authority_ca_file": str(sb.ca_path),
    }


def submission(sb: Sandbox, **extra: Any) -> dict[str, Any]:
    return {
        "name": "submission",
        "type": "submission",
        "host": "127.0.0.1",
        "port": sb.submission_port,
        "ca_file": str(sb.ca_path),
        "mailbox": "scanner@contoso.test",
        **oauth(sb),
        **extra,
    }


def direct_send(sb: Sandbox, **extra: Any) -> dict[str, Any]:
    return {
        "name": "direct",
        "type": "direct_send",
        "host": "127.0.0.1",
        "port": sb.mx_port,
        "ca_file": str(sb.ca_path),
        "accepted_domains": ["contoso.test", "fabrikam.test"],
        **extra,
    }


def connector(sb: Sandbox, cert: tuple[Path, Path] | None = None, **extra: Any) -> dict[str, Any]:
    out = {
        "name": "connector",
        "type": "connector",
        "host": "127.0.0.1",
        "port": sb.mx_port,
        "ca_file": str(sb.ca_path),
        **extra,
    }
    if cert is not None:
        out |= {"client_cert_file": str(cert[0]), "client_key_file": str(cert[1])}
    return out


async def send(relay: Relay, mail_from: str, rcpts: list[str], body: bytes) -> str:
    """One message into the relay's ``lan`` listener with smtplib; its queue id."""

    def client() -> str:
        with smtplib.SMTP("127.0.0.1", relay.ports["lan"], timeout=10) as s:
            s.ehlo("printer.lan")
            s.mail(mail_from)
            for r in rcpts:
                s.rcpt(r)
            code, reply = s.data(body)
            assert code == 250, reply
            return reply.decode().split()[-1]

    return await asyncio.to_thread(client)


async def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait (bounded) until ``predicate()`` holds, checking every 50 ms."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)
