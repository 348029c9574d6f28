"""``relay365 serve`` with no configuration: the relay in front of the built-in sandbox tenant.

A newcomer gets a working relay at once: a device listener on 127.0.0.1:2525, Direct Send for the
tenant's own domains and SMTP AUTH submission (OAuth2 XOAUTH2) for everyone else, both into the local
Exchange Online sandbox, whose mailboxes can be looked into with ``relay365 sandbox mail list``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from relay365.admin.accounts import Role
from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import Tenant, example_tenant
from relay365.service.console import SandboxMailboxes
from relay365.service.relay import Relay
from relay365.service.serve import serve
from relay365.settings import Settings, parse_settings

DEMO_PORT = 2525
DEMO_MAILBOX = "scanner@contoso.test"


def _app_secret_file(tenant: Tenant, state: Path) -> tuple[str, Path]:
    app = next(a for a in tenant.apps.values() if a.client_secret and "SMTP.SendAsApp" in a.permissions)
    path = state / "demo-app-secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(app.client_secret or "")
    return app.client_id, path


def demo_settings(sb: Sandbox, state: Path, *, port: int = DEMO_PORT) -> Settings:
    tenant = sb.ctx.tenant
    client_id, secret = _app_secret_file(tenant, state)
    common: dict[str, Any] = {"host": sb.host, "ca_file": str(sb.ca_path)}
    data: dict[str, Any] = {
        "server": {"hostname": "relay365.demo", "spool_dir": str(state / "spool"), "auth_failure_delay": 1.0},
        "listener": [{"name": "demo", "address": "127.0.0.1", "port": port, "tls": "starttls"}],
        "device": [
            {"name": "demo-device", "ip_allow": ["127.0.0.0/8", "::1/128"], "rewrite_sender": DEMO_MAILBOX}
        ],
        "delivery": {"min_backoff": 30, "max_backoff": 600, "poll_interval": 2},
        # The console on loopback, any free port; its one-time password is printed at start.
        "admin": {"address": "127.0.0.1", "port": 0},
        "transport": [
            {
                "name": "direct-send",
                "type": "direct_send",
                **common,
                "port": sb.mx_port,
                "accepted_domains": list(tenant.accepted_domains),
            },
            {
                "name": "submission",
                "type": "submission",
                **common,
                "port": sb.submission_port,
                "mailbox": DEMO_MAILBOX,
                "tenant": tenant.tenant_id,
                "client_id": client_id,
                "client_secret_file": str(secret),
                "authority": sb.base_url,
                "authority_ca_file": str(sb.ca_path),
                "graph_url": sb.graph_url,  # its app also reads the sandbox's message trace
            },
        ],
        # Microsoft 365's side of each message (the sandbox's message trace), a minute after the 250.
        "tracing": {"poll_interval": 60},
        "route": [
            {
                "name": "internal",
                "transport": "direct-send",
                "recipient_domains": list(tenant.accepted_domains),
            },
            {"name": "external", "transport": "submission"},
        ],
    }
    return parse_settings(data, base=state)


def print_device_settings(console: Console, settings: Settings, relay: Relay, state: Path) -> None:
    listener = settings.listeners[0]
    table = Table(title="Type these settings into a printer, scanner or application")
    table.add_column("Device setting")
    table.add_column("Value")
    for row in (
        ("Server / smart host", listener.address),
        ("Port", str(relay.ports.get(listener.name, listener.port))),
        ("TLS / StartTLS", "optional (STARTTLS offered, self-signed certificate)"),
        ("User name and password", "none: this computer (127.0.0.1) is allow-listed"),
        ("Sender address", f"anything: relay365 sends as {DEMO_MAILBOX}"),
    ):
        table.add_row(*row)
    console.print(table)
    console.print(
        "Internal recipients (@contoso.test, @fabrikam.test) go by Direct Send, others by SMTP AUTH"
        " submission with OAuth2, into the local Exchange Online sandbox.\n"
        f"Try:   swaks --server 127.0.0.1:{relay.ports.get(listener.name)} --to alice@contoso.test\n"
        f"Then:  {cli_command()} sandbox mail list --state-dir {state / 'sandbox'}",
        highlight=False,
    )


def cli_command() -> str:
    """How to type ``relay365`` in another shell: inside a virtual environment (``./scripts/run``
    installs into .venv, which a new shell has not activated) the full path of its script."""
    script = Path(sys.executable).parent / "relay365"
    if sys.prefix != sys.base_prefix and script.exists():
        return str(script)
    return "relay365"


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxPorts:
    """Where the demo's sandbox listens (0: any free port), so a demo can run beside other services."""

    submission: int = 0
    mx: int = 0
    http: int = 0


async def run_demo(
    state: Path,
    *,
    port: int = DEMO_PORT,
    sandbox_ports: SandboxPorts = SandboxPorts(),
    ready: Callable[[Relay], None] = lambda relay: None,
) -> None:
    await asyncio.to_thread(state.mkdir, parents=True, exist_ok=True, mode=0o700)
    tenant = dataclasses.replace(
        example_tenant(),
        submission_port=sandbox_ports.submission,
        mx_port=sandbox_ports.mx,
        http_port=sandbox_ports.http,
    )
    async with Sandbox(tenant, state_dir=state / "sandbox") as sb:
        settings = demo_settings(sb, state, port=port)
        console = Console(stderr=True)

        def on_ready(relay: Relay) -> None:
            print_device_settings(console, settings, relay, state)
            console.print(
                f"Sandbox: SMTP AUTH 127.0.0.1:{sb.submission_port}, MX 127.0.0.1:{sb.mx_port}, "
                f"HTTPS (token, Graph) {sb.base_url}",
                highlight=False,
            )
            if relay.console is not None:
                # Lives only in this process: a restart prints a new one, nothing is written to disk.
                password = secrets.token_urlsafe(12)
                relay.console.guard.accounts.add_ephemeral("admin", password, Role.OPERATOR)
                console.print(
                    f"Console: {relay.admin_url} (user admin, password {password})",
                    highlight=False,
                    soft_wrap=True,
                )
            ready(relay)

        mailboxes = SandboxMailboxes(sb.ctx.store, sorted(sb.ctx.tenant.mailboxes))
        await serve(settings, ready=on_ready, mailboxes=mailboxes)
