"""The ``relay365`` command line: serve, config check, device passwd, queue, send (and the sandbox and
setup tools, registered from their own packages)."""

from __future__ import annotations

import asyncio
import getpass
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from relay365 import __version__
from relay365.errors import ConfigError, QueueEntryNotFound, Relay365Error
from relay365.logformats import LOG_FORMATS
from relay365.settings import Settings, load_settings
from relay365.spool.model import QueueEntry
from relay365.spool.sqlite import SqliteSpool

app = typer.Typer(
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
app.add_typer(config_app, name="config")
app.add_typer(device_app, name="device")
app.add_typer(queue_app, name="queue")
app.add_typer(route_app, name="route")
console = Console()
err = Console(stderr=True)
T = TypeVar("T")

DEFAULT_CONFIG = Path("relay365.toml")
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="relay365.toml")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"relay365 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def _settings(path: Path) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as e:
        raise _fail(str(e)) from None


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(help="relay365.toml to validate")]) -> None:
    """Validate FILE; print a summary, or the key and value that are wrong."""
    s = _settings(file)
    console.print(
        f"[green]ok[/green] {file}: {len(s.listeners)} listener(s), {len(s.devices)} device(s),"
        f" {len(s.transports)} transport(s), {len(s.routes)} route(s)",
        highlight=False,
    )


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


@app.command()
def serve(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="relay365.toml (default: ./relay365.toml)")
    ] = None,
    demo_dir: Annotated[Path, typer.Option(help="state of the no-config demo")] = Path("var/demo"),
    demo_port: Annotated[int, typer.Option(help="device port of the no-config demo")] = 2525,
    log_format: Annotated[
        str | None, typer.Option(help="auto | text | journal | json (default: [server] log_format)")
    ] = None,
) -> None:
    """Run the relay until SIGTERM/SIGINT. With no relay365.toml: the relay in front of the built-in
    Exchange Online sandbox (a working demo on 127.0.0.1:2525)."""
    from relay365.credentials import Redactor
    from relay365.logsetup import configure_logging

    if log_format is not None and log_format not in LOG_FORMATS:
        raise _fail(f"--log-format {log_format!r}: one of {', '.join(LOG_FORMATS)}")
    if config is None and not DEFAULT_CONFIG.exists():
        from relay365.demo import run_demo

        configure_logging("INFO", Redactor(), log_format or "auto")
        err.print("No relay365.toml here: starting the demo (relay365 + local Exchange Online sandbox).")
        try:
            asyncio.run(run_demo(demo_dir.absolute(), port=demo_port))
        except (Relay365Error, OSError) as e:
            raise _fail(str(e)) from None
        return
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
    from relay365.app import transport_rules
    from relay365.delivery.router import NoRoute, Router

    settings = _settings(config)
    router = Router(settings.routes, accepts=transport_rules(settings))
    table = Table(title=f"from=<{mail_from}> size={size} device={device or '-'}")
    for col in ("recipient", "route", "transport", "why"):
        table.add_column(col, overflow="fold")
    unroutable = False
    for rcpt in to:
        try:
            c = router.choose(rcpt=rcpt, sender=mail_from, device=device, size=size)
            kind = settings.transport(c.transport).type
            then = f"; if it is refused: {', '.join(c.fallbacks)}" if c.fallbacks else ""
            table.add_row(rcpt, c.route, f"{c.transport} ({kind})", c.reason + then)

        except NoRoute as e:
            unroutable = True
            table.add_row(rcpt, "-", "-", f"[red]bounced at once[/red]: {e}")
    console.print(table)
    if unroutable:
        raise typer.Exit(1)


@app.command()
def login(
    transport: Annotated[str, typer.Argument(help="name of a submission/graph transport")],
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """Sign in once with the device code flow; the refresh token then renews itself unattended."""
    from relay365.oauth import GRAPH_SCOPE, SMTP_SCOPE
    from relay365.transports.submission import token_source

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
        user = source.login_device_flow(lambda text: console.print(text, highlight=False))
    except Relay365Error as e:
        raise _fail(str(e)) from None
    finally:
        source.close()
    console.print(f"[green]signed in[/green] as {user}; token cache: {t.m365.token_cache}")


def _with_spool(config: Path, fn: Callable[[SqliteSpool], Awaitable[T]]) -> T:
    settings = _settings(config)
    if not (settings.server.spool_dir / "queue.db").exists():
        raise _fail(f"no spool at {settings.server.spool_dir} (has the server run yet?)")

    async def run() -> T:
        spool = SqliteSpool(settings.server.spool_dir)
        await spool.open(recover=False)
        try:
            return await fn(spool)
        finally:
            await spool.close()

    try:
        return asyncio.run(run())
    except QueueEntryNotFound as e:
        raise _fail(f"no queue entry {e}") from None
    except Relay365Error as e:
        raise _fail(str(e)) from None


def _age(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@queue_app.command("list")
def queue_list(config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """One row per queued message."""
    entries = _with_spool(config, lambda spool: spool.list())
    table = Table(title=f"{len(entries)} message(s) in the queue")
    for col in ("queue id", "age", "size", "from", "device", "recipients", "state", "last reply"):
        table.add_column(col, overflow="fold")
    now = time.time()
    for e in entries:
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
    console.print(table)


def _show(e: QueueEntry) -> None:
    console.print(
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
    console.print(table)


@queue_app.command("show")
def queue_show(queue_id: str, config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Envelope and per-recipient state of one message."""
    _show(_with_spool(config, lambda spool: spool.get(queue_id)))


@queue_app.command("hold")
def queue_hold(queue_id: str, config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Keep a message in the queue without delivering it."""
    _with_spool(config, lambda spool: spool.hold(queue_id, True))
    console.print(f"{queue_id} held")


@queue_app.command("release")
def queue_release(queue_id: str, config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Release a held message."""
    _with_spool(config, lambda spool: spool.hold(queue_id, False))
    console.print(f"{queue_id} released")


@queue_app.command("retry")
def queue_retry(queue_id: str, config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Make a deferred message due now (the server picks it up within its poll interval)."""
    _with_spool(config, lambda spool: spool.retry(queue_id, time.time()))
    console.print(f"{queue_id} scheduled for delivery now")


@queue_app.command("delete")
def queue_delete(queue_id: str, config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Remove a message from the queue without a bounce."""
    _with_spool(config, lambda spool: spool.delete(queue_id))
    console.print(f"{queue_id} deleted")


@app.command()
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
    console.print(f"[green]accepted[/green]: {reply}", highlight=False)


def _register_subcommands() -> None:
    """The sandbox and the setup tools live in their own packages and bring their own commands."""
    from relay365.diagnostics.cli import register
    from relay365.sandbox.cli import app as sandbox_app
    from relay365.service.cli import register as register_service
    from relay365.setup.cli import register as register_setup

    app.add_typer(sandbox_app, name="sandbox")
    register(app)
    register_setup(app, config_app)
    register_service(app)


_register_subcommands()


def main() -> None:
    app()
