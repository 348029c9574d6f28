"""What the advisor prints: device settings, the relay365 config snippet, DNS records, JSON and rich."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from relay365.diagnostics.advisor import Option, Recommendation, certificate_connector, title
from relay365.diagnostics.endpoints import SUBMISSION_HOST, mx_endpoint
from relay365.diagnostics.spf import MICROSOFT_INCLUDE, recommended_record

__all__ = ["DeviceSettings", "DnsRecord", "config_snippet", "device_settings", "dns_records", "mx_endpoint"]


@dataclass(frozen=True, slots=True)
class DeviceSettings:
    server: str
    port: int
    tls: str
    credentials: str
    sender: str


@dataclass(frozen=True, slots=True)
class DnsRecord:
    name: str
    type: str
    value: str
    why: str


def device_settings(rec: Recommendation) -> DeviceSettings:
    a = rec.answers
    mailbox = a.mailbox or f"scanner@{a.domain}"
    if rec.via_relay365:
        port = 465 if a.port465_only else 587
        tls = (
            "implicit TLS (SMTPS)"
            if a.port465_only
            else ("STARTTLS" if a.tls12 else "STARTTLS if the device has it (TLS 1.0+), else none on the LAN")
        )
        return DeviceSettings(
            server="the relay365 host (its LAN name or address)",
            port=port,
            tls=tls,
            credentials="a relay365 device login, or none if relay365 allows the device's IP",
            sender=mailbox if rec.option in (Option.SUBMISSION, Option.GRAPH) else f"any address @{a.domain}",
        )
    if rec.option is Option.SUBMISSION:
        return DeviceSettings(
            server=SUBMISSION_HOST,
            port=587,
            tls="STARTTLS, TLS 1.2 or later",
            credentials=f"{mailbox} with OAuth 2.0 (XOAUTH2)",
            sender=f"{mailbox} (or a mailbox it has Send As on)",
        )
    tls = "optional (STARTTLS if supported)" if rec.option is Option.DIRECT_SEND else "STARTTLS enabled"
    return DeviceSettings(
        server=mx_endpoint(a.domain),
        port=25,
        tls=tls,
        credentials="none"
        + (" (the connector recognises your static IP)" if rec.option is Option.CONNECTOR else ""),
        sender=f"any address @{a.domain} (no mailbox needed)",
    )


def dns_records(rec: Recommendation) -> tuple[DnsRecord, ...]:
    a = rec.answers
    if rec.option in (Option.DIRECT_SEND, Option.CONNECTOR):
        ip = a.public_ip or "<static IP>"
        value = (
            recommended_record(a.public_ip) if a.public_ip else f"v=spf1 ip4:{ip} {MICROSOFT_INCLUDE} ~all"
        )
        why = "authorises your public IP (seed article); merge with an existing record: relay365 spf --ip"
        return (DnsRecord(a.domain, "TXT", value, why),)
    return (
        DnsRecord(
            a.domain,
            "TXT",
            f"v=spf1 {MICROSOFT_INCLUDE} -all",
            "Exchange Online sends for you: your SPF record must include spf.protection.outlook.com",
        ),
    )


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _listener_lines(rec: Recommendation) -> list[str]:
    a = rec.answers
    lines = [
        "",
        "# Where devices connect. Add cert_file/key_file (a certificate for the relay's LAN name) so",
        "# devices can verify the relay; without them relay365 makes a self-signed certificate.",
        "[[listener]]",
        'name = "devices"',
        'address = "0.0.0.0"',
    ]
    if a.port465_only:
        lines += ["port = 465", 'tls = "implicit"                   # SMTPS: the device only does port 465']
    else:
        lines += ["port = 587", 'tls = "starttls"']
    if not a.tls12:
        lines += [
            'min_tls_version = "1.0"             # the device has no TLS 1.2: old TLS, on the LAN only',
            "legacy = true",
        ]
    return lines


def _transport_lines(rec: Recommendation) -> list[str]:
    a = rec.answers
    o = rec.option
    mailbox = a.mailbox or f"scanner@{a.domain}"
    lines = ["", "# How relay365 delivers to Microsoft 365.", "[[transport]]", f"name = {_q(o.value)}"]
    lines.append(f"type = {_q(o.value)}")
    if o is Option.SUBMISSION:
        lines += [
            f"host = {_q(SUBMISSION_HOST)}",
            "port = 587",
            'tls = "required"',
            f"mailbox = {_q(mailbox)}               # CHANGE: the licensed mailbox mail is sent as",
        ]
    elif o is Option.GRAPH:
        lines += [
            f"mailbox = {_q(mailbox)}               # CHANGE: the mailbox mail is sent as",
            f"save_to_sent_items = {'true' if a.sent_items else 'false'}",
        ]
    else:
        tls = "opportunistic" if o is Option.DIRECT_SEND else "required"
        lines += [
            f"host = {_q(mx_endpoint(a.domain))}   # CHANGE: the MX value in the admin center",
            "port = 25",
            f"tls = {_q(tls)}",
            f"accepted_domains = [{_q(a.domain)}]   # CHANGE: all of your accepted domains",
        ]
        if certificate_connector(o, a):
            lines += [
                "# The certificate-based connector knows relay365 by this certificate (public CA, CN or",
                f"# SAN = relay.{a.domain} or another name in your domains, intermediates after it).",
                'client_cert_file = "connector.pem"   # CHANGE: next to this file, or an absolute path',
                'client_key_file = "connector.key"    # CHANGE: its private key (mode 0600)',
            ]
    if o in (Option.SUBMISSION, Option.GRAPH):
        lines += [
            f"tenant = {_q(a.domain)}                  # your tenant's domain or directory (tenant) id",
            'client_id = "00000000-0000-0000-0000-000000000000"   # CHANGE: application (client) id',
            'client_secret_env = "RELAY365_CLIENT_SECRET"         # the variable holding the secret',
        ]
    return lines


def config_snippet(rec: Recommendation) -> str:
    """A relay365.toml that parses as-is (``relay365.settings``); lines marked CHANGE need your values."""
    a = rec.answers
    internal_only = rec.option is Option.DIRECT_SEND or not a.external_recipients
    head = "relay365 in front of the device" if rec.via_relay365 else "if you put relay365 in front"
    lines = [
        f"# relay365.toml generated by `relay365 advise` ({head}).",
        "# Change the values marked CHANGE, then check everything with:",
        "#   relay365 doctor --config relay365.toml --send-test you@" + a.domain,
        "[server]",
        f"hostname = {_q('relay.' + a.domain)}            # CHANGE: the relay's name on your LAN",
        'spool_dir = "/var/spool/relay365"',
        *_listener_lines(rec),
        "",
        "# Which devices may send (by address; or give them a login: relay365 device passwd NAME).",
        "[[device]]",
        'name = "devices"',
        'ip_allow = ["192.168.1.0/24"]      # CHANGE: the device\'s address or subnet',
        *_transport_lines(rec),
        "",
        "[[route]]",
        f"name = {_q('devices-' + rec.option.value)}",
        f"transport = {_q(rec.option.value)}",
    ]
    if internal_only:
        lines.append(f"recipient_domains = [{_q(a.domain)}]   # internal recipients only")
    return "\n".join(lines) + "\n"


def to_dict(rec: Recommendation) -> dict[str, Any]:
    return {
        "recommendation": {
            "transport": rec.option.value,
            "via_relay365": rec.via_relay365,
            "title": title(rec.option, rec.answers),
        },
        "reasons": list(rec.reasons),
        "rejected": [
            {"option": c.option.value, "via_relay365": c.via_relay365, "why": list(c.blockers)}
            for c in rec.rejected
        ],
        "alternatives": [
            {"option": c.option.value, "via_relay365": c.via_relay365} for c in rec.alternatives
        ],
        "warnings": list(rec.warnings),
        "device": asdict(device_settings(rec)),
        "relay365_config": config_snippet(rec),
        "dns": [asdict(r) for r in dns_records(rec)],
        "answers": rec.answers.to_dict(),
    }


def render(rec: Recommendation, console: Console) -> None:
    head = ("relay365 in front of " if rec.via_relay365 else "") + title(rec.option, rec.answers)
    body = "\n".join(f"[green]+[/] {escape(r)}" for r in rec.reasons)
    if rec.warnings:
        body += "\n" + "\n".join(f"[yellow]![/] {escape(w)}" for w in rec.warnings)
    console.print(Panel(body, title=f"Recommended: {head}", border_style="green"))
    if rec.rejected:
        table = Table(title="Rejected options", show_lines=False)
        table.add_column("Option", no_wrap=True)
        table.add_column("Why not", overflow="fold")
        for c in rec.rejected:
            table.add_row(Text(c.label), Text("\n".join(c.blockers)))
        console.print(table)
    settings = device_settings(rec)
    grid = Table(title="Type into the device", show_header=False)
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("Server / smart host", Text(settings.server))
    grid.add_row("Port", str(settings.port))
    grid.add_row("TLS", Text(settings.tls))
    grid.add_row("Credentials", Text(settings.credentials))
    grid.add_row("Sender address", Text(settings.sender))
    console.print(grid)
    # The config is printed as plain lines, never wrapped or boxed, so what is copied from a narrow
    # terminal is the same valid TOML that --write saves.
    console.rule("relay365.toml (save it with --write FILE)", style="cyan")
    console.print(Text(config_snippet(rec).rstrip()), soft_wrap=True, highlight=False)
    console.rule(style="cyan")
    for record in dns_records(rec):
        value = f"[green]{escape(record.value)}[/]"
        console.print(f"[bold]DNS[/] {escape(record.name)} {record.type} {value}  ({escape(record.why)})")
