"""The ``relay365`` command line: serve, config check, device passwd, queue, send (and the sandbox and
setup tools, registered from their own packages)."""

from __future__ import annotations

import asyncio
import functools
import getpass
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from relay365 import __version__
from relay365.errors import ConfigError, QueueEntryNotFound, Relay365Error
from relay365.logformats import LOG_FORMATS
from relay365.settings import Settings, load_settings
from relay365.spool.contract import QueueAdmin
from relay365.spool.factory import locate, open_spool, spool_exists
from relay365.spool.model import QueueEntry, QueueFilter, QueueState, entry_dict

if TYPE_CHECKING:  # rich is imported when something is printed: serve prints through logging (issue 11)
    from rich.console import Console

_app = typer.Typer(  # the core commands; ``app`` (below) adds the tools'
    help="relay365: get mail from devices and applications into Microsoft 365.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Check the config file; print the documented example.", no_args_is_help=True)
device_app = typer.Typer(help="Device credentials.", no_args_is_help=True)
route_app = typer.Typer(help="Explain routing decisions.", no_args_is_help=True)
queue_app = typer.Typer(
    help="Inspect and manage the queue (works while the server runs).", no_args_is_help=True
)
_app.add_typer(config_app, name="config")
_app.add_typer(device_app, name="device")
_app.add_typer(queue_app, name="queue")
_app.add_typer(route_app, name="route")
T = TypeVar("T")

DEFAULT_CONFIG = Path("relay365.toml")
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="relay365.toml")]


@functools.cache
def _console(*, stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"relay365 {__version__}")
        raise typer.Exit()


@_app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def _fail(message: str, code: int = 2) -> typer.Exit:
    from rich.markup import escape

    _console(stderr=True).print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(code)


def _settings(path: Path) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as e:
        raise _fail(str(e)) from None


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(help="relay365.toml to validate")]) -> None:
    """Validate FILE and run serve's preflight (secrets, certificates, ports, spool): passes exactly
    when 'relay365 serve' would start. Prints a summary, or every problem with its key and file, and
    warns about senders Microsoft will refuse (5.7.60)."""
    from rich.markup import escape

    from relay365.diagnostics.sendas import send_as_risks
    from relay365.service.preflight import preflight_for

    s = _settings(file)

    async def check() -> list[str]:
        report = await preflight_for(s)
        await report.close()
        return report.warnings

    try:
        warnings = asyncio.run(check())
    except Relay365Error as e:
        raise _fail(str(e)) from None
    for warning in warnings:
        _console(stderr=True).print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    _console().print(
        f"[green]ok[/green] {file}: {len(s.listeners)} listener(s), {len(s.devices)} device(s),"
        f" {len(s.transports)} transport(s), {len(s.routes)} route(s)",
        highlight=False,
    )
    for risk in send_as_risks(s):  # valid, but Microsoft will refuse these senders (5.7.60)
        _console().print(f"[yellow]warning[/yellow] {risk.message}\n  fix: {risk.fix}", highlight=False)


@device_app.command("passwd")
def device_passwd(
    name: Annotated[str, typer.Argument(help="device name (also its SMTP AUTH username)")],
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="read it from stdin")] = False,
) -> None:
    """Hash a device password with Argon2id and print the config line to paste."""
    from relay365.credentials import hash_password

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for device {name}: ")
        if getpass.getpass("Again: ") != password:
            raise _fail("the passwords differ")
    try:
        hashed = hash_password(password)
    except Relay365Error as e:
        raise _fail(str(e)) from None
    typer.echo(f'# [[device]] name = "{name}"\npassword_hash = "{hashed}"')


@_app.command()
def serve(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="relay365.toml (default: ./relay365.toml)")
    ] = None,
    demo_dir: Annotated[Path, typer.Option(help="state of the no-config demo")] = Path("var/demo"),
    port: Annotated[
        int, typer.Option("--port", "--demo-port", help="device port of the no-config demo")
    ] = 2525,
    sandbox_submission_port: Annotated[
        int, typer.Option(help="demo: the sandbox's SMTP AUTH port (0: any free port)")
    ] = 0,
    sandbox_mx_port: Annotated[int, typer.Option(help="demo: the sandbox's MX port (0: any free port)")] = 0,
    sandbox_http_port: Annotated[
        int, typer.Option(help="demo: the sandbox's HTTPS port, token endpoint and Graph (0: any)")
    ] = 0,
    log_format: Annotated[
        str | None, typer.Option(help="auto | text | journal | json (default: [server] log_format)")
    ] = None,
) -> None:
    """Run the relay until SIGTERM/SIGINT. With no relay365.toml: the relay in front of the built-in
    Exchange Online sandbox (a working demo on 127.0.0.1:2525; --port and --sandbox-*-port pin the
    ports so it runs beside other services)."""
    from relay365.credentials import Redactor
    from relay365.logsetup import configure_logging

    if log_format is not None and log_format not in LOG_FORMATS:
        raise _fail(f"--log-format {log_format!r}: one of {', '.join(LOG_FORMATS)}")
    demo_ports = (port, sandbox_submission_port, sandbox_mx_port, sandbox_http_port)
    for value in demo_ports:
        if not 0 <= value <= 65535:
            raise _fail(f"port {value} is not a TCP port (0-65535)")
    if config is None and not DEFAULT_CONFIG.exists():
        from relay365.service.demo import SandboxPorts, run_demo

        configure_logging("INFO", Redactor(), log_format or "auto")
        _console(stderr=True).print(
            "No relay365.toml here: starting the demo (relay365 + local Exchange Online sandbox)."
        )
        ports = SandboxPorts(submission=sandbox_submission_port, mx=sandbox_mx_port, http=sandbox_http_port)
        try:
            asyncio.run(run_demo(demo_dir.absolute(), port=port, sandbox_ports=ports))
        except (Relay365Error, OSError) as e:
            raise _fail(str(e)) from None
        return
    if demo_ports != (2525, 0, 0, 0):
        raise _fail(
            "--port and --sandbox-*-port are for the demo (no relay365.toml); with a config, "
            "set each [[listener]] port in the file"
        )
    from relay365.service.run import serve_config

    code = serve_config(config or DEFAULT_CONFIG, log_format=log_format)
    if code:
        raise typer.Exit(code)


@route_app.command("test")
def route_test(
    mail_from: Annotated[str, typer.Option("--from", help="envelope sender")],
    to: Annotated[list[str], typer.Option("--to", help="recipient (repeatable)")],
    size: Annotated[int, typer.Option(help="message size in bytes")] = 10_000,
    device: Annotated[str, typer.Option(help="device name")] = "",
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """Explain which route and transport each recipient would take, and why."""
    from rich.table import Table

    from relay365.delivery.router import NoRoute, Router
    from relay365.diagnostics.sendas import sender_risk
    from relay365.transports.registry import null_sender_transports, recipient_rules

    settings = _settings(config)
    rewrite = next((d.rewrite_sender for d in settings.devices if d.name == device), None)
    sender = rewrite or mail_from  # the relay rewrites before it routes
    router = Router(
        settings.routes, accepts=recipient_rules(settings), null_sender=null_sender_transports(settings)
    )
    shown = f"<{mail_from}>" + (f" rewritten to <{rewrite}>" if rewrite else "")
    table = Table(title=f"from={shown} size={size} device={device or '-'}")
    for col in ("recipient", "route", "transport", "why"):
        table.add_column(col, overflow="fold")
    unroutable = False
    warnings: set[str] = set()
    for rcpt in to:
        try:
            c = router.choose(rcpt=rcpt, sender=sender, device=device, size=size)
            kind = settings.transport(c.transport).type
            then = f"; if it is refused: {', '.join(c.fallbacks)}" if c.fallbacks else ""
            table.add_row(rcpt, c.route, f"{c.transport} ({kind})", c.reason + then)
            for name in (c.transport, *c.fallbacks):
                risk = sender_risk(settings, transport=name, sender=sender)
                if risk:
                    warnings.add(risk)
        except NoRoute as e:
            unroutable = True
            table.add_row(rcpt, "-", "-", f"[red]bounced at once[/red]: {e}")
    _console().print(table)
    for warning in sorted(warnings):
        _console().print(f"[yellow]warning[/yellow] {warning}", highlight=False)
    if unroutable:
        raise typer.Exit(1)


@_app.command()
def login(
    transport: Annotated[str, typer.Argument(help="name of a submission/graph transport")],
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """Sign in once with the device code flow; the refresh token then renews itself unattended."""
    from relay365.oauth import GRAPH_SCOPE, SMTP_SCOPE, token_source

    settings = _settings(config)
    try:
        t = settings.transport(transport)
    except KeyError:
        raise _fail(f"no transport named {transport!r} in {config}") from None
    if t.m365.token_cache is None:
        raise _fail(f"transport {transport}: set token_cache (a file for the refresh token) first")
    source = token_source(t, scope=GRAPH_SCOPE if t.type == "graph" else SMTP_SCOPE)
    if not source.delegated:
        raise _fail(f"transport {transport} uses an app secret/certificate: no sign-in needed")
    try:
        user = source.login_device_flow(lambda text: _console().print(text, highlight=False))
    except Relay365Error as e:
        raise _fail(str(e)) from None
    finally:
        source.close()
    _console().print(f"[green]signed in[/green] as {user}; token cache: {t.m365.token_cache}")


def _with_spool(config: Path, fn: Callable[[QueueAdmin], Awaitable[T]]) -> T:
    settings = _settings(config)
    try:
        if not spool_exists(settings):
            raise _fail(f"no spool at {locate(settings).path} (has the server run yet?)")
    except ConfigError as e:
        raise _fail(str(e)) from None

    async def run() -> T:
        async with open_spool(settings) as spool:
            return await fn(spool)

    try:
        return asyncio.run(run())
    except QueueEntryNotFound as e:
        raise _fail(f"no queue entry {e}") from None
    except Relay365Error as e:
        raise _fail(str(e)) from None


def _age(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


StateOpt = Annotated[
    QueueState | None,
    typer.Option(help="messages with a recipient in this state, or 'held' for messages on hold"),
]
DeviceOpt = Annotated[str | None, typer.Option(help="messages from this device")]
SenderOpt = Annotated[
    str | None, typer.Option(help="envelope sender: an address, @domain, a * pattern, or <>")
]
RecipientOpt = Annotated[str | None, typer.Option(help="a recipient: an address, @domain or a * pattern")]


@queue_app.command("list")
def queue_list(
    state: StateOpt = None,
    device: DeviceOpt = None,
    sender: SenderOpt = None,
    recipient: RecipientOpt = None,
    limit: Annotated[int, typer.Option(min=0, help="show at most N messages, oldest first (0: all)")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (for scripts)")] = False,
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """One row per queued message, oldest first; filters combine (all must hold)."""
    from rich.table import Table

    where = QueueFilter(state=state, device=device, sender=sender, recipient=recipient)
    page = _with_spool(config, lambda spool: spool.query(where, limit=limit or None))
    if as_json:
        shown = [entry_dict(e) for e in page.entries]
        typer.echo(json.dumps({"total": page.total, "shown": len(shown), "messages": shown}, indent=1))
        return
    title = f"{page.total} message(s) in the queue" + ("" if where.is_empty() else " match")
    if len(page.entries) < page.total:
        title += f"; showing the oldest {len(page.entries)} (--limit)"
    table = Table(title=title)
    for col in ("queue id", "age", "size", "from", "device", "recipients", "state", "last reply"):
        table.add_column(col, overflow="fold")
    now = time.time()
    for e in page.entries:
        states = sorted({r.state.value for r in e.recipients})
        last = next((r.last_reply for r in e.recipients if r.last_reply), "")
        table.add_row(
            e.queue_id,
            _age(now - e.received_at),
            str(e.size),
            e.envelope.mail_from or "<>",
            e.envelope.device,
            str(len(e.recipients)),
            ("HOLD " if e.held else "") + ",".join(states),
            last,
        )
    _console().print(table)


def _show(e: QueueEntry) -> None:
    from rich.table import Table

    _console().print(
        f"[bold]{e.queue_id}[/bold] from=<{e.envelope.mail_from}> device={e.envelope.device}"
        f" peer={e.envelope.peer} size={e.size} held={e.held}",
        highlight=False,
    )
    table = Table()
    for col in ("recipient", "state", "attempts", "next attempt", "last reply"):
        table.add_column(col, overflow="fold")
    for r in e.recipients:
        nxt = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.next_attempt))
        table.add_row(r.rcpt, r.state.value, str(r.attempts), nxt, r.last_reply)
    _console().print(table)


@queue_app.command("show")
def queue_show(
    queue_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="as JSON")] = False,
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """Envelope and per-recipient state of one message, and for the recipients Microsoft 365 already
    accepted what its message trace says happened to them (from the tracking log)."""
    from rich.markup import escape
    from rich.table import Table

    from relay365.console_cli import microsoft_side

    entry = _with_spool(config, lambda spool: spool.get(queue_id))
    microsoft = microsoft_side(_settings(config), entry.queue_id)
    if as_json:
        typer.echo(json.dumps({**entry_dict(entry), "microsoft": microsoft}, ensure_ascii=False))
        return
    _show(entry)
    if microsoft:
        table = Table(title="inside Microsoft 365 (message trace)")
        for col in ("recipient", "status", "reason", "what to do"):
            table.add_column(col, overflow="fold")
        for row in microsoft:
            cells = (row.get(k) or "" for k in ("recipient", "status", "reason", "advice"))
            table.add_row(*(escape(str(c)) for c in cells))
        _console().print(table)


@queue_app.command("hold")
def queue_hold(queue_id: str, config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Keep a message in the queue without delivering it."""
    _with_spool(config, lambda spool: spool.hold(queue_id, True))
    _console().print(f"{queue_id} held")


@queue_app.command("release")
def queue_release(queue_id: str, config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Release a held message."""
    _with_spool(config, lambda spool: spool.hold(queue_id, False))
    _console().print(f"{queue_id} released")


@queue_app.command("retry")
def queue_retry(
    queue_ids: Annotated[list[str] | None, typer.Argument(help="queue ids", show_default=False)] = None,
    every: Annotated[bool, typer.Option("--all", help="every message in the queue")] = False,
    state: StateOpt = None,
    device: DeviceOpt = None,
    sender: SenderOpt = None,
    recipient: RecipientOpt = None,
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """Make messages due now: by queue id, --all, or by filter (a running server picks them up at
    once and stops holding back unreachable upstreams). Held messages stay held."""
    where = QueueFilter(state=state, device=device, sender=sender, recipient=recipient)
    chosen = [bool(queue_ids), every, not where.is_empty()]
    if sum(chosen) != 1:
        raise _fail(
            "name the messages one way: queue ids, --all, or filters"
            " (--state, --device, --sender, --recipient)"
        )
    now = time.time()
    if queue_ids:
        ids = queue_ids

        async def each(spool: QueueAdmin) -> None:
            for qid in ids:
                await spool.retry(qid, now)

        _with_spool(config, each)
        for qid in ids:
            _console().print(f"{qid} scheduled for delivery now")
        return
    count = _with_spool(config, lambda spool: spool.retry_matching(where, now))
    _console().print(f"{count} message(s) scheduled for delivery now")


@queue_app.command("delete")
def queue_delete(queue_id: str, config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Remove a message from the queue without a bounce."""
    _with_spool(config, lambda spool: spool.delete(queue_id))
    _console().print(f"{queue_id} deleted")


@_app.command()
def send(
    server: Annotated[str, typer.Option(help="host:port of the SMTP server to test")] = "127.0.0.1:2525",
    mail_from: Annotated[
        str, typer.Option("--from", help="envelope and header sender")
    ] = "test@relay365.local",
    to: Annotated[list[str], typer.Option("--to", help="recipient (repeatable)")] = ["user@example.com"],  # noqa: B006
    subject: Annotated[str, typer.Option()] = "relay365 test message",
    body: Annotated[str, typer.Option()] = "This is a test message sent by relay365 send.",
    tls: Annotated[str, typer.Option(help="starttls | implicit | none")] = "starttls",
    user: Annotated[str | None, typer.Option(help="SMTP AUTH username")] = None,
    password_env: Annotated[str | None, typer.Option(help="env var holding the AUTH password")] = None,
    ca_file: Annotated[Path | None, typer.Option(help="CA bundle to verify the server")] = None,
    insecure: Annotated[bool, typer.Option(help="do not verify the server certificate")] = False,
) -> None:
    """Send a test message to any SMTP server (e.g. a relay365 listener) and print its replies."""
    from relay365.sendtest import SendOptions, send_test

    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise _fail(f"--server {server!r} is not host:port")
    if tls not in ("starttls", "implicit", "none"):
        raise _fail(f"--tls {tls!r} must be starttls, implicit or none")
    opts = SendOptions(
        host=host,
        port=int(port),
        mail_from=mail_from,
        to=tuple(to),
        subject=subject,
        body=body,
        tls=tls,
        user=user,
        password_env=password_env,
        ca_file=ca_file,
        verify=not insecure,
    )
    try:
        reply = asyncio.run(send_test(opts))
    except Relay365Error as e:
        raise _fail(str(e), code=1) from None
    _console().print(f"[green]accepted[/green]: {reply}", highlight=False)


def _register_subcommands() -> None:
    """The sandbox and the setup tools live in their own packages and bring their own commands."""
    from relay365.console_cli import register as register_console
    from relay365.diagnostics.cli import register
    from relay365.sandbox.cli import app as sandbox_app
    from relay365.setup.cli import register as register_setup
    from relay365.setup.service_cli import register as register_service
    from relay365.spool_cli import register as register_spool

    _app.add_typer(sandbox_app, name="sandbox")
    register_spool(_app)
    register(_app)
    register_console(_app)
    register_setup(_app, config_app)
    register_service(_app)


@functools.cache
def full_app() -> typer.Typer:
    """The whole command line: the core commands and those the tools' packages bring (registered once:
    importing those packages costs time and memory that ``serve`` and ``--version`` do without)."""
    _register_subcommands()
    return _app


def __getattr__(name: str) -> typer.Typer:
    """``relay365.cli.app``: the whole command line (tests invoke it with typer's CliRunner)."""
    if name == "app":
        return full_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["serve"] or args == ["--version"]:
        _app()  # a slim serve process: none of the tools' commands (nor their imports)
    else:
        full_app()()
