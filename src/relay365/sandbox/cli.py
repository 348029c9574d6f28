"""``relay365 sandbox``: run the local Exchange Online, look into its mailboxes and rejection counters.

::

    relay365 sandbox [--tenant FILE] [--state-dir DIR] [--submission-port N] [--mx-port N] [--http-port N]
                                                           run every endpoint until Ctrl-C
    relay365 sandbox mail list [--mailbox A] [--folder F] [--json]   (F: Inbox, JunkEmail, Quarantine, ...)
    relay365 sandbox mail show ID [--raw]
    relay365 sandbox rejections [--json]

Without ``--tenant`` the built-in example tenant (``example_tenant.toml``, contoso.test) runs. On start
the settings a device would use are printed per option, in the form of Microsoft's article (server,
port, TLS, credentials).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from relay365.errors import ConfigError, Relay365Error

DEFAULT_STATE_DIR = Path(".relay365-sandbox")

app = typer.Typer(help="A faithful local Exchange Online: SMTP submission, MX, token endpoint, Graph.")
mail_app = typer.Typer(help="Messages the sandbox accepted.")
app.add_typer(mail_app, name="mail")

StateDir = Annotated[Path, typer.Option("--state-dir", help="Where mailboxes and TLS material live.")]

if TYPE_CHECKING:
    from relay365.sandbox.runner import Sandbox
    from relay365.sandbox.tenant import Tenant


def _console() -> Console:
    return Console(width=120, soft_wrap=True)


def _mx_host(tenant: Tenant) -> str:
    return tenant.accepted_domains[0].replace(".", "-") + ".mail.protection.outlook.com"


def _connectors_text(tenant: Tenant) -> str:
    parts = []
    for connector in tenant.connectors:
        if not connector.enabled:
            continue
        if connector.tls_sender_certificate_name:
            parts.append(f"{connector.name}: TLS certificate CN/SAN {connector.tls_sender_certificate_name}")
        if connector.sender_ip_ranges:
            ranges = ", ".join(str(r) for r in connector.sender_ip_ranges)
            parts.append(f"{connector.name}: sender IP {ranges}")
    return "; ".join(parts) or "none configured"


def settings_tables(sandbox: Sandbox, tenant: Tenant) -> list[Table]:
    """Per option, the settings to enter in a device (Microsoft's article's table form)."""
    host = sandbox.host
    ca = str(sandbox.ca_path)
    smtp_apps = sorted(a.client_id for a in tenant.apps.values() if "SMTP.SendAsApp" in a.permissions)
    graph_apps = sorted(a.client_id for a in tenant.apps.values() if "Mail.Send" in a.permissions)
    limits = tenant.limits
    trace_apps = sorted(
        a.client_id for a in tenant.apps.values() if "ExchangeMessageTrace.Read.All" in a.permissions
    )
    basic = "or Basic (AUTH LOGIN) mailbox address and password" if tenant.basic_auth_allowed else (
        "Basic authentication is disabled (550 5.7.30)"
    )  # fmt: skip
    rows: list[tuple[str, list[tuple[str, str]]]] = [
        (
            "Option 1: SMTP AUTH client submission (smtp.office365.com)",
            [
                ("Server/smart host", f"{host} (plays smtp.office365.com)"),
                ("Port", str(sandbox.submission_port)),
                ("TLS/StartTLS", f"Required, STARTTLS, TLS 1.2+; trust the CA in {ca}"),
                (
                    "Username/email address and password",
                    f"XOAUTH2: mailbox address + token from {sandbox.authority}/oauth2/v2.0/token "
                    f"(scope https://outlook.office365.com/.default, apps {', '.join(smtp_apps) or 'none'}); "
                    f"{basic}",
                ),
            ],
        ),
        (
            f"Option 2: Direct Send ({_mx_host(tenant)})",
            [
                ("Server/smart host", f"{host} (plays {_mx_host(tenant)})"),
                ("Port", str(sandbox.mx_port)),
                ("TLS/StartTLS", "Optional"),
                (
                    "Username/email address and password",
                    "None; sender any address in " + ", ".join(tenant.accepted_domains),
                ),
                ("Recipients", "Mailboxes of this tenant only"),
            ],
        ),
        (
            "Option 3: SMTP relay through a connector",
            [
                ("Server/smart host", f"{host} (plays {_mx_host(tenant)})"),
                ("Port", str(sandbox.mx_port)),
                ("TLS/StartTLS", "Enabled (required for a certificate connector)"),
                (
                    "Username/email address and password",
                    "None; connectors: " + _connectors_text(tenant),
                ),
            ],
        ),
        (
            "Graph sendMail (graph.microsoft.com)",
            [
                ("Endpoint", f"POST {sandbox.graph_url}/users/{{id}}/sendMail"),
                ("Port", str(sandbox.http_port)),
                ("TLS", f"HTTPS; trust the CA in {ca}"),
                (
                    "Credentials",
                    f"app token from {sandbox.authority} (Mail.Send; apps {', '.join(graph_apps) or 'none'})",
                ),
                (
                    "Message trace",
                    f"GET {sandbox.graph_url}/admin/exchange/tracing/messageTraces "
                    f"(ExchangeMessageTrace.Read.All; apps {', '.join(trace_apps) or 'none'}; "
                    f"{limits.trace_requests_per_window} requests per {limits.trace_window_seconds} s)",
                ),
            ],
        ),
    ]
    tables = []
    for title, values in rows:
        table = Table(title=title, title_justify="left", show_header=True)
        table.add_column("Device or application setting", no_wrap=True)
        table.add_column("Value")
        for name, value in values:
            table.add_row(name, value)
        tables.append(table)
    return tables


async def _serve(tenant: Tenant, state_dir: Path, console: Console) -> None:
    from relay365.sandbox.runner import Sandbox

    # Ctrl-C and SIGTERM (a service manager, `kill`) stop it the same way, also when the shell that
    # started it in the background made it ignore SIGINT.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Sandbox(tenant, state_dir=state_dir) as sandbox:
        console.print(f"[bold]relay365 sandbox[/bold] for {tenant.name} ({tenant.tenant_id})")
        for table in settings_tables(sandbox, tenant):
            console.print(table)
        console.print(f"Mailboxes: {state_dir / 'mail'}   Admin API: {sandbox.base_url}/_sandbox/messages")
        console.print(
            "Spoofed Direct Send (SPF without the sending IP) lands in JunkEmail, mail flow rules may "
            f"quarantine: relay365 sandbox mail list --state-dir {state_dir} --folder JunkEmail|Quarantine"
        )
        console.print("Running. Press Ctrl-C to stop.")
        await stop.wait()


@app.callback(invoke_without_command=True)
def sandbox(
    ctx: typer.Context,
    tenant: Annotated[Path | None, typer.Option("--tenant", help="Tenant TOML file.")] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    submission_port: Annotated[
        int | None, typer.Option(help="SMTP AUTH port (default: the tenant's, 0 = any free port)")
    ] = None,
    mx_port: Annotated[int | None, typer.Option(help="MX port (default: the tenant's)")] = None,
    http_port: Annotated[
        int | None, typer.Option(help="HTTPS port: token endpoint and Graph (default: the tenant's)")
    ] = None,
) -> None:
    """Run the sandbox (all endpoints) until Ctrl-C."""
    from relay365.sandbox.tenant import example_tenant, load_tenant

    if ctx.invoked_subcommand is not None:
        return
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    console = _console()
    pinned = {"submission_port": submission_port, "mx_port": mx_port, "http_port": http_port}
    try:
        model = load_tenant(tenant) if tenant is not None else example_tenant()
        for key, value in pinned.items():
            if value is not None and not 0 <= value <= 65535:
                raise ConfigError(f"--{key.replace('_', '-')}", value, "Not a TCP port (0-65535).")
        model = dataclasses.replace(
            model,
            submission_port=model.submission_port if submission_port is None else submission_port,
            mx_port=model.mx_port if mx_port is None else mx_port,
            http_port=model.http_port if http_port is None else http_port,
        )
        asyncio.run(_serve(model, state_dir, console))
        console.print("Stopped.")
    except KeyboardInterrupt:  # Ctrl-C before the handlers were in place
        console.print("Stopped.")
    except (ConfigError, Relay365Error) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc


def _when(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


@mail_app.command("list")
def mail_list(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    mailbox: Annotated[str | None, typer.Option(help="Only this mailbox (or external address).")] = None,
    folder: Annotated[
        str | None,
        typer.Option(help="Inbox, JunkEmail, SentItems, Drafts, Internet (left the tenant) or Quarantine."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List stored messages, oldest first."""
    from relay365.sandbox.store import MailStore

    messages = MailStore(state_dir / "mail").list(mailbox=mailbox, folder=folder)
    if as_json:
        typer.echo(json.dumps([m.to_json() for m in messages], indent=1))
        return
    table = Table(show_header=True)
    for column in ("Id", "Received (UTC)", "Folder", "Mailbox", "Via", "From", "Authenticated as", "Subject"):
        table.add_column(column)
    for m in messages:
        table.add_row(
            m.id, _when(m.received_at), m.folder, m.mailbox, m.endpoint, m.mail_from,
            m.authenticated_as or "-", m.subject,
        )  # fmt: skip
    _console().print(table)
    typer.echo(f"{len(messages)} message(s)")


@mail_app.command("show")
def mail_show(
    message_id: Annotated[str, typer.Argument(help="The message id from 'mail list'.")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
    raw: Annotated[bool, typer.Option("--raw", help="Only the message as received.")] = False,
) -> None:
    """Show one message: envelope, endpoint, identity, headers and content."""
    from relay365.sandbox.store import MailStore, MessageNotFound

    store = MailStore(state_dir / "mail")
    try:
        meta = store.get(message_id)
        content = store.content(message_id)
    except MessageNotFound as exc:
        typer.echo(f"No message {message_id!r} in {state_dir / 'mail'}.", err=True)
        raise typer.Exit(1) from exc
    if not raw:
        for name, value in (
            ("Id", meta.id), ("Folder", f"{meta.mailbox}/{meta.folder}"), ("Endpoint", meta.endpoint),
            ("MAIL FROM", meta.mail_from), ("RCPT TO", ", ".join(meta.rcpt_tos)),
            ("Authenticated as", meta.authenticated_as or "-"),
            ("Received", _when(meta.received_at) + " UTC"), ("Size", str(meta.size)),
        ):  # fmt: skip
            typer.echo(f"{name + ':':<18}{value}")
        typer.echo("")
    typer.echo(content.decode("utf-8", "replace"), nl=False)


@app.command("rejections")
def rejections(
    state_dir: StateDir = DEFAULT_STATE_DIR, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Counters of every rejection, by endpoint and reply code."""
    from relay365.sandbox.store import MailStore

    counters = MailStore(state_dir / "mail").rejections()
    if as_json:
        typer.echo(json.dumps(counters, indent=1, sort_keys=True))
        return
    if not counters:
        typer.echo("No rejections.")
        return
    for key, count in sorted(counters.items()):
        typer.echo(f"{count:>8}  {key}")


if __name__ == "__main__":
    app()
