"""The diagnostics commands of the ``relay365`` CLI: explain, spf, advise, doctor.

The composition root calls :func:`register` on the root Typer app.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from relay365.errors import ConfigError


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def explain_command(
    code_or_text: Annotated[str, typer.Argument(help="A reply line, a pasted NDR line or a code.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Explain an Exchange Online reply code or NDR line: meaning, fix, and retry or bounce."""
    from relay365.diagnostics import explain as explain_mod

    explanation = explain_mod.explain(code_or_text)
    if as_json:
        _print_json(explanation.to_dict())
    else:
        explain_mod.render(explanation, Console())
    if explanation.entry is None:
        raise typer.Exit(code=1)


NameserverOpt = Annotated[
    str | None,
    typer.Option("--nameserver", help="Resolve with this server (IP[:PORT]) instead of the system's."),
]


def spf_command(
    ip: Annotated[str, typer.Option("--ip", help="The static public IP the device or relay sends from.")],
    domain: Annotated[
        str | None, typer.Option("--domain", help="Merge with this domain's published SPF record.")
    ] = None,
    nameserver: NameserverOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Print the SPF record Microsoft recommends for Direct Send / connector relay, merged with the
    domain's existing record."""
    from relay365.diagnostics import spf as spf_mod
    from relay365.diagnostics.render import render_spf
    from relay365.netdns import make_resolver

    try:
        resolver = make_resolver(nameserver) if domain else None
        report = spf_mod.build_report(ip, domain, resolver)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc
    except ValueError as exc:
        raise typer.BadParameter(f"--ip {ip!r} is not an IP address") from exc
    if as_json:
        _print_json(report.to_dict())
    else:
        render_spf(report, Console())


def _opt(flag: str, help_text: str) -> Any:
    return typer.Option(flag, help=help_text, show_default=False)


def advise_command(
    external: Annotated[
        bool | None, _opt("--external/--internal-only", "Recipients outside the organization?")
    ] = None,
    tls12: Annotated[bool | None, _opt("--tls12/--no-tls12", "Device supports TLS 1.2+?")] = None,
    oauth: Annotated[bool | None, _opt("--oauth/--no-oauth", "Device supports OAuth (XOAUTH2)?")] = None,
    port465_only: Annotated[
        bool | None, _opt("--port465-only/--not-port465-only", "Device only does 465?")
    ] = None,
    smtp_auth_disabled: Annotated[
        bool | None, _opt("--smtp-auth-disabled/--smtp-auth-enabled", "SMTP AUTH off in the tenant?")
    ] = None,
    reject_direct_send: Annotated[
        bool | None, _opt("--reject-direct-send/--allow-direct-send", "RejectDirectSend on?")
    ] = None,
    static_ip: Annotated[bool | None, _opt("--static-ip/--no-static-ip", "Static public IP?")] = None,
    sent_items: Annotated[bool | None, _opt("--sent-items/--no-sent-items", "Copies in Sent Items?")] = None,
    third_party_cloud: Annotated[
        bool | None, _opt("--third-party-cloud/--own-network", "Hosted in a third-party cloud?")
    ] = None,
    daily_messages: Annotated[int | None, _opt("--daily-messages", "Messages per day.")] = None,
    daily_recipients: Annotated[int | None, _opt("--daily-recipients", "Recipients per day.")] = None,
    domain: Annotated[str, typer.Option("--domain", help="Your accepted domain.")] = "contoso.com",
    public_ip: Annotated[str | None, typer.Option("--public-ip", help="The static public IP.")] = None,
    mailbox: Annotated[str | None, typer.Option("--mailbox", help="The sending mailbox.")] = None,
    answers_file: Annotated[
        Path | None, typer.Option("--answers", help="JSON file with the answers.")
    ] = None,
    no_input: Annotated[
        bool, typer.Option("--no-input", help="Never prompt; fail on a missing answer.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    write: Annotated[
        Path | None, typer.Option("--write", help="Save the suggested relay365.toml to this file.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="With --write: replace an existing file.")] = False,
) -> None:
    """Recommend how a device or application should send through Microsoft 365 (the article's table)."""
    from relay365.diagnostics import advisor, advisor_output

    if write is not None and write.exists() and not force:
        raise typer.BadParameter(f"--write {write}: the file exists (add --force to replace it)")
    given: dict[str, Any] = {}
    if answers_file is not None:
        try:
            given = json.loads(answers_file.read_text())
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"--answers {answers_file}: {exc}") from exc
        if not isinstance(given, dict):
            raise typer.BadParameter(f"--answers {answers_file}: not a JSON object")
    flags = {
        "external_recipients": external, "tls12": tls12, "oauth": oauth, "port465_only": port465_only,
        "smtp_auth_disabled": smtp_auth_disabled, "reject_direct_send": reject_direct_send,
        "static_ip": static_ip, "sent_items": sent_items, "third_party_cloud": third_party_cloud,
        "daily_messages": daily_messages, "daily_recipients": daily_recipients, "public_ip": public_ip,
        "mailbox": mailbox,
    }  # fmt: skip
    given |= {k: v for k, v in flags.items() if v is not None}
    given.setdefault("domain", domain)
    _ask_missing(given, no_input=no_input)
    try:
        answers = advisor.Answers.from_dict(given)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc
    rec = advisor.recommend(answers)
    if as_json:
        _print_json(advisor_output.to_dict(rec))
    else:
        advisor_output.render(rec, Console())
    if write is not None:
        try:
            write.write_text(advisor_output.config_snippet(rec), encoding="utf-8")
        except OSError as exc:
            raise typer.BadParameter(f"--write {write}: {exc.strerror or exc}") from exc
        Console(stderr=True).print(
            f"wrote {write}: change the lines marked CHANGE, then run relay365 config check {write}",
            highlight=False,
        )


def _ask_missing(given: dict[str, Any], *, no_input: bool) -> None:
    from rich.prompt import Confirm, IntPrompt

    from relay365.diagnostics import advisor

    missing = [k for k in (*advisor.BOOL_QUESTIONS, *advisor.INT_QUESTIONS) if k not in given]
    if missing and no_input:
        required = [k for k in missing if k in advisor.REQUIRED]
        if required:
            raise typer.BadParameter(f"missing answer: {required[0]} (--no-input)")
        return
    for key in missing:
        if key in advisor.BOOL_QUESTIONS:
            given[key] = Confirm.ask(advisor.BOOL_QUESTIONS[key], default=False)
        else:
            given[key] = IntPrompt.ask(advisor.INT_QUESTIONS[key], default=0)


def doctor_command(
    domain: Annotated[
        list[str] | None, typer.Option("--domain", help="Accepted domain to check (repeatable).")
    ] = None,
    public_ip: Annotated[
        str | None, typer.Option("--public-ip", help="The public IP mail leaves from.")
    ] = None,
    nameserver: NameserverOpt = None,
    smtp_host: Annotated[
        str | None, typer.Option("--smtp-host", help="Submission endpoint to check.")
    ] = None,
    smtp_port: Annotated[int, typer.Option("--smtp-port")] = 587,
    smtp_name: Annotated[
        str | None, typer.Option("--smtp-name", help="TLS name expected for --smtp-host.")
    ] = None,
    mx_host: Annotated[
        str | None, typer.Option("--mx-host", help="MX endpoint (Direct Send / connector).")
    ] = None,
    mx_port: Annotated[int, typer.Option("--mx-port")] = 25,
    mx_name: Annotated[str | None, typer.Option("--mx-name", help="TLS name expected for --mx-host.")] = None,
    probe_mx: Annotated[
        bool, typer.Option("--probe-mx", help="Also connect to each --domain's MX endpoint on --mx-port.")
    ] = False,
    ca_file: Annotated[Path | None, typer.Option("--ca-file", help="Trust this CA bundle (PEM).")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per network step.")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="Check this relay365.toml (relay, transports, auth).")
    ] = None,
    send_test: Annotated[
        str | None, typer.Option("--send-test", help="Send a tracked test message to this address.")
    ] = None,
    send_from: Annotated[str | None, typer.Option("--send-from", help="Sender of the test message.")] = None,
    relay_host: Annotated[
        str | None, typer.Option("--relay-host", help="Relay address for --send-test (default: listener).")
    ] = None,
    relay_port: Annotated[
        int | None, typer.Option("--relay-port", help="Relay port for --send-test (default: listener).")
    ] = None,
    relay_ca_file: Annotated[
        Path | None, typer.Option("--relay-ca-file", help="Verify the relay's certificate with this CA.")
    ] = None,
    send_user: Annotated[
        str | None, typer.Option("--send-user", help="Device login for --send-test, if required.")
    ] = None,
    send_password_env: Annotated[
        str | None, typer.Option("--send-password-env", help="Variable holding --send-user's password.")
    ] = None,
    sandbox_url: Annotated[
        str | None,
        typer.Option("--sandbox-url", help="Running sandbox's HTTPS base: report where the test landed."),
    ] = None,
    wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for the test message.")] = 60.0,
    dns_checks: Annotated[
        bool, typer.Option("--dns/--no-dns", help="--config: check MX/SPF of the accepted domains.")
    ] = True,
) -> None:
    """Check a relay365 config (--config) and/or DNS (MX, SPF), network reach, TLS and EHLO: pass / warn /
    fail with fixes. --send-test sends a tracked message through the running relay."""
    from relay365.diagnostics import doctor
    from relay365.diagnostics.checks import CheckResult, Status
    from relay365.diagnostics.doctor_config import ConfigDoctorOptions, run_config_doctor
    from relay365.diagnostics.sendcheck import SendTestOptions

    if send_test is not None and config is None:
        raise typer.BadParameter("--send-test needs --config (the relay's listener)")
    send_opts = None
    if send_test is not None:
        send_opts = SendTestOptions(
            to=send_test, mail_from=send_from, relay_host=relay_host, relay_port=relay_port,
            ca_file=relay_ca_file, user=send_user, password_env=send_password_env,
            sandbox_url=sandbox_url, sandbox_ca_file=ca_file, timeout_s=wait,
        )  # fmt: skip
    opts = doctor.DoctorOptions(
        domains=tuple(domain or ()), public_ip=public_ip, nameserver=nameserver, smtp_host=smtp_host,
        smtp_port=smtp_port, smtp_server_name=smtp_name, mx_host=mx_host, mx_port=mx_port,
        mx_server_name=mx_name, ca_file=str(ca_file) if ca_file else None, timeout_s=timeout,
        probe_mx=probe_mx,
    )  # fmt: skip
    flag_mode = bool(opts.domains or opts.smtp_host or opts.mx_host)
    if not flag_mode and config is None:
        raise typer.BadParameter("nothing to check: give --config, --domain, --smtp-host or --mx-host")
    results: list[CheckResult] = []
    try:
        if config is not None:
            cfg = ConfigDoctorOptions(
                config=config, timeout_s=timeout, send_test=send_opts, check_dns=dns_checks,
                nameserver=nameserver, public_ip=public_ip,
            )  # fmt: skip
            results += asyncio.run(run_config_doctor(cfg))
        if flag_mode:
            results += asyncio.run(doctor.run_doctor(opts))
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if as_json:
        _print_json({"status": doctor.worst(results).value, "checks": [r.to_dict() for r in results]})
    else:
        doctor.render(results, Console())
    if doctor.worst(results) is Status.FAIL:
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Add the diagnostics commands to ``app``."""
    app.command("explain")(explain_command)
    app.command("spf")(spf_command)
    app.command("advise")(advise_command)
    app.command("doctor")(doctor_command)
