"""The relay365 -> sandbox setup of the trace follower tests: a sandbox on a manual clock whose tenant
is read from a file (the admin edits the SPF record in it), and relay configs that follow Direct Send
with the example tenant's app (it has ExchangeMessageTrace.Read.All)."""

from __future__ import annotations

import asyncio
import json
import smtplib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import EXAMPLE_TENANT_PATH, Tenant, load_tenant
from relay365.service.relay import Relay
from tests.core.helpers import run_cli
from tests.m365.conftest import direct_send, submission

FABRIKAM_SPF = '"fabrikam.test" = "v=spf1 include:spf.protection.outlook.com -all"'
FABRIKAM_SPF_FIXED = '"fabrikam.test" = "v=spf1 ip4:203.0.113.5 include:spf.protection.outlook.com -all"'
MAIL_ONLY = "12121212-3434-4565-8787-909090909090"  # an app without the trace permission


def tenant_file(tmp_path: Path, extra: str = "") -> Path:
    """A copy of the example tenant file (fabrikam.test's SPF record lacks the office's 203.0.113.5).
    Tokens live a week: the tests move the sandbox clock by hours, while msal's token cache keeps
    wall-clock time and would offer a token the sandbox already sees as expired."""
    text = EXAMPLE_TENANT_PATH.read_text(encoding="utf-8")
    assert FABRIKAM_SPF in text and "token_lifetime = 3600" in text
    text = text.replace("token_lifetime = 3600", "token_lifetime = 604800")
    path = tmp_path / "tenant.toml"
    path.write_text(text + extra, encoding="utf-8")
    return path


def publish_spf(path: Path, sandbox: Sandbox) -> Tenant:
    """The admin adds the office IP to fabrikam.test's SPF record; the sandbox reads the file again."""
    path.write_text(path.read_text(encoding="utf-8").replace(FABRIKAM_SPF, FABRIKAM_SPF_FIXED), "utf-8")
    sandbox.ctx.tenant = load_tenant(path)
    return sandbox.ctx.tenant


def follow_sections(sb: Sandbox, *, app: dict[str, Any] | None = None, **tracing: Any) -> dict[str, Any]:
    """Direct Send carries the mail; the submission transport's app reads the trace (Graph on the
    sandbox). Every recipient domain is routed to Direct Send."""
    reader = app or submission(sb, graph_url=sb.graph_url)
    return {
        "transport": [direct_send(sb), reader],
        "route": [{"name": "scans", "transport": "direct"}],
        "tracing": {"poll_interval": 60, "app": reader["name"], **tracing},
    }


async def submit(relay: Relay, mail_from: str, rcpt: str, subject: str, number: int) -> str:
    def client() -> str:
        body = (
            f"From: {mail_from}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
            f"Message-ID: <scan-{number}@printer.contoso.test>\r\n\r\npage {number}\r\n"
        ).encode()
        with smtplib.SMTP("127.0.0.1", relay.ports["lan"], timeout=10) as s:
            s.ehlo("printer.lan")
            s.mail(mail_from)
            s.rcpt(rcpt)
            code, reply = s.data(body)
            assert code == 250, reply
            return reply.decode().split()[-1]

    return await asyncio.to_thread(client)


async def until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def trace_json(config: Path, *args: str) -> list[dict[str, Any]]:
    """``relay365 trace ... --json`` as an admin runs it (a subprocess on the relay's files)."""
    done = await asyncio.to_thread(run_cli, "trace", *args, "--json", "-c", str(config))
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]
