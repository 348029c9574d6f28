"""``relay365 init`` and ``relay365 config example`` (registered by the composition root).

``init`` asks only what its flags did not answer; with ``--non-interactive`` it never asks and names
the flag of a missing answer instead.
"""

from __future__ import annotations

import getpass
import json
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.prompt import Confirm, IntPrompt, Prompt

from relay365.credentials import hash_password
from relay365.diagnostics import advisor
from relay365.diagnostics.advisor import Option
from relay365.errors import ConfigError, InstallError, Relay365Error
from relay365.setup.example import example_config_text
from relay365.setup.files import write_file
from relay365.setup.init import (
    DEFAULT_SECRET_ENV,
    OAUTH_OPTIONS,
    DeviceLogin,
    InitPlan,
    check_rendered,
    default_spool,
    render_config,
    secret_instructions,
)

err = Console(stderr=True)
OPTIONS = tuple(o.value for o in Option)


class _Asker:
    """Answers from flags first; a prompt for the rest, or an error naming the flag."""

    def __init__(self, *, interactive: bool) -> None:
        self.interactive = interactive

    def missing(self, flag: str) -> typer.BadParameter:
        return typer.BadParameter(f"missing answer: {flag} (--non-interactive)")

    def text(self, given: str | None, flag: str, question: str, default: str | None = None) -> str:
        if given is not None:
            return given
        if not self.interactive:
            if default is not None:
                return default
            raise self.missing(flag)
        return Prompt.ask(question, default=default, console=err) or ""

    def many(self, given: list[str] | None, flag: str, question: str, required: bool) -> tuple[str, ...]:
        if given:
            return tuple(given)
        if not self.interactive:
            if required:
                raise self.missing(flag)
            return ()
        answer = Prompt.ask(question + (" (comma-separated)" if required else ", comma-separated, or none"),
                            default="" if not required else None, console=err)  # fmt: skip
        return tuple(x.strip() for x in (answer or "").split(",") if x.strip())


def _read_password(name: str, from_stdin: bool) -> str:
    if from_stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line:
            raise typer.BadParameter(f"no password for device {name} on standard input")
        return line.rstrip("\r\n")
    password = getpass.getpass(f"Password for device {name}: ")
    if getpass.getpass("Again: ") != password:
        raise typer.BadParameter(f"the passwords for {name} differ")
    return password


def _advise(ask: _Asker, answers_file: Path | None, domain: str) -> advisor.Recommendation:
    """The advisor's questions (or its answers file) and its recommendation."""
    given: dict[str, Any] = {}
    if answers_file is not None:
        try:
            given = json.loads(answers_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise typer.BadParameter(f"--answers {answers_file}: {e}") from None
        if not isinstance(given, dict):
            raise typer.BadParameter(f"--answers {answers_file}: not a JSON object")
    given.setdefault("domain", domain)
    for key, question in advisor.BOOL_QUESTIONS.items():
        if key not in given and ask.interactive:
            given[key] = Confirm.ask(question, default=False, console=err)
    for key, question in advisor.INT_QUESTIONS.items():
        if key not in given and ask.interactive:
            given[key] = IntPrompt.ask(question, default=0, console=err)
    try:
        rec = advisor.recommend(advisor.Answers.from_dict(given))
    except ConfigError as e:
        raise typer.BadParameter(f"advisor answers: {e}") from None
    err.print(f"Recommended: {advisor.TITLES[rec.option]}", highlight=False)
    for reason in rec.reasons:
        err.print(f"  + {reason}", highlight=False)
    for warning in rec.warnings:
        err.print(f"  ! {warning}", highlight=False)
    return rec


def init_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="the file to write")] = Path("relay365.toml"),
    transport: Annotated[
        str | None,
        typer.Option("--transport", help=f"{' | '.join(OPTIONS)} | advise (ask the advisor's questions)"),
    ] = None,
    answers: Annotated[
        Path | None, typer.Option("--answers", help="the advisor's answers (JSON, as relay365 advise)")
    ] = None,
    domain: Annotated[
        list[str] | None, typer.Option("--domain", help="an accepted domain of the tenant (repeatable)")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="directory (tenant) id or domain")] = None,
    client_id: Annotated[str | None, typer.Option(help="application (client) id of the app")] = None,
    mailbox: Annotated[str | None, typer.Option(help="the mailbox relay365 sends as")] = None,
    client_secret_env: Annotated[
        str | None, typer.Option(help=f"variable holding the client secret (default {DEFAULT_SECRET_ENV})")
    ] = None,
    client_secret_file: Annotated[
        str | None, typer.Option(help="file holding the client secret (mode 0600)")
    ] = None,
    device_ip: Annotated[
        list[str] | None, typer.Option("--device-ip", help="address/subnet allowed without password")
    ] = None,
    device_login: Annotated[
        list[str] | None, typer.Option("--device-login", help="a device that logs in (repeatable)")
    ] = None,
    device_password_stdin: Annotated[
        bool, typer.Option(help="read the --device-login passwords from stdin, one line each")
    ] = False,
    port: Annotated[int | None, typer.Option(help="port devices connect to (default 587)")] = None,
    tls: Annotated[str | None, typer.Option(help="none | starttls | starttls-required | implicit")] = None,
    legacy_tls: Annotated[bool, typer.Option(help="allow TLS 1.0/1.1 (old devices)")] = False,
    hostname: Annotated[str | None, typer.Option(help="the relay's name (default: this host's)")] = None,
    spool_dir: Annotated[
        str | None, typer.Option(help="default: /var/lib/relay365/spool for /etc/relay365, else var/spool")
    ] = None,
    non_interactive: Annotated[
        bool, typer.Option("--non-interactive", "--no-input", help="never ask; fail on a missing answer")
    ] = False,
    force: Annotated[bool, typer.Option(help="overwrite an existing file")] = False,
) -> None:
    """Write a working relay365.toml from a few answers: the delivery option (or the advisor's
    questions), the tenant, the mailbox, the devices. No secret goes into it."""
    if output.exists() and not force:
        raise typer.BadParameter(f"{output} exists: not overwriting it (use --force to replace it)")
    ask = _Asker(interactive=not non_interactive)
    domains = ask.many(domain, "--domain", "Accepted domain(s) of your tenant", True)
    domains = tuple(d.lower().strip().lstrip("@") for d in domains)
    option, plan_args = _choose_option(ask, transport, answers, domains[0])
    if option in OAUTH_OPTIONS:
        plan_args["tenant"] = ask.text(tenant, "--tenant", "Tenant (directory id or domain)", domains[0])
        plan_args["client_id"] = ask.text(client_id, "--client-id", "Application (client) id of the app")
        plan_args["mailbox"] = ask.text(mailbox, "--mailbox", "Mailbox relay365 sends as")
        if client_secret_file is not None:
            plan_args["secret_file"] = client_secret_file
        else:
            question = "Client secret: environment variable name (or a file path starting with /)"
            where = ask.text(client_secret_env, "--client-secret-env", question, DEFAULT_SECRET_ENV)
            plan_args["secret_file" if where.startswith("/") else "secret_env"] = where
    ips, logins = _devices(ask, device_ip, device_login, from_stdin=device_password_stdin)
    plan_args |= {k: v for k, v in (("port", port), ("tls", tls)) if v is not None}
    if legacy_tls:
        plan_args["legacy_tls"] = True
    plan = InitPlan(
        option=option,
        domains=domains,
        hostname=hostname or socket.getfqdn(),
        spool_dir=spool_dir or default_spool(output),
        ip_allow=ips,
        logins=logins,
        **plan_args,
    )
    _write(plan, output, force=force)


def _choose_option(
    ask: _Asker, transport: str | None, answers: Path | None, domain: str
) -> tuple[Option, dict[str, Any]]:
    """The option given, or the advisor's (its answers also shape the listener)."""
    if transport is None and answers is not None:
        transport = "advise"
    choice = ask.text(transport, "--transport", "Delivery option", "advise" if ask.interactive else None)
    if choice not in (*OPTIONS, "advise"):
        raise typer.BadParameter(f"--transport {choice!r}: one of {', '.join(OPTIONS)}, advise")
    if choice != "advise":
        return Option(choice), {}
    rec = _advise(ask, answers, domain)
    a = rec.answers
    return rec.option, {
        "port": 465 if a.port465_only else 587,
        "tls": "implicit" if a.port465_only else "starttls",
        "legacy_tls": not a.tls12,
        "internal_only": not a.external_recipients,
        "sent_items": a.sent_items,
    }


def _devices(
    ask: _Asker, device_ip: list[str] | None, device_login: list[str] | None, *, from_stdin: bool
) -> tuple[tuple[str, ...], tuple[DeviceLogin, ...]]:
    ips = ask.many(device_ip, "--device-ip", "Device addresses/subnets allowed without password", False)
    names = ask.many(device_login, "--device-login", "Devices that log in with a password", False)
    if not ips and not names and not ask.interactive:
        raise ask.missing("--device-ip or --device-login")
    try:
        logins = tuple(
            DeviceLogin(name=n, password_hash=hash_password(_read_password(n, from_stdin))) for n in names
        )
    except Relay365Error as e:
        raise typer.BadParameter(str(e)) from None
    return ips, logins


def _write(plan: InitPlan, output: Path, *, force: bool) -> None:
    try:
        text = render_config(plan)
        settings = check_rendered(text, output)
        write_file(output, text, mode=0o640, force=force)
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from None
    except InstallError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    err.print(
        f"[green]wrote[/green] {output}: {len(settings.listeners)} listener(s), {len(settings.devices)}"
        f" device(s), transport {plan.option.value}",
        highlight=False,
    )
    for line in secret_instructions(plan):
        err.print(f"  {line}", highlight=False)
    err.print(
        f"Next: relay365 config check {output}   (once the secrets are in place), relay365 doctor --config"
        f" {output}, then relay365 serve --config {output} or, as a service: relay365 service install"
        f" --config {output.absolute()}",
        highlight=False,
    )


def example_command(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="write it to this file instead of stdout")
    ] = None,
    force: Annotated[bool, typer.Option(help="overwrite an existing file")] = False,
) -> None:
    """Print the documented example config (every key, with comments), or write it to a file."""
    text = example_config_text()
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        write_file(output, text, mode=0o644, force=force)
    except InstallError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    err.print(f"wrote {output}; check it with: relay365 config check {output}", highlight=False)


def register(app: typer.Typer, config_app: typer.Typer) -> None:
    app.command("init")(init_command)
    config_app.command("example")(example_command)
