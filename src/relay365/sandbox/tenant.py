"""The sandbox tenant model: one frozen description of an Exchange Online organisation.

A tenant is read once from a TOML file (see ``example_tenant.toml`` next to this module) and then
passed down explicitly. Defaults follow Microsoft's documented values (see
``docs/exchange-online.md``): 30 messages/minute and 10,000 recipients/24 h per mailbox, 3 concurrent
SMTP AUTH connections, 35 MB messages, 500 recipients per message, Graph 4 concurrent requests per
mailbox and 10,000 requests per 10 minutes. Basic authentication is off by default, as it is for
every tenant from the end of December 2026.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from relay365.errors import ConfigError
from relay365.sandbox.tenant_mailflow import MailFlowRule, SpoofAction, mail_flow_from_mapping

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# ExchangeMessageTrace.Read.All: Graph's message trace (learn.microsoft.com/graph/api/
# messagetracingroot-list-messagetraces, "Permissions": application and delegated).
KNOWN_PERMISSIONS = frozenset(
    {"SMTP.SendAsApp", "Mail.Send", "Mail.ReadWrite", "SMTP.Send", "ExchangeMessageTrace.Read.All"}
)

EXAMPLE_TENANT_PATH = Path(__file__).with_name("example_tenant.toml")


@dataclass(frozen=True)
class Mailbox:
    """An Exchange Online recipient. ``smtp_auth_disabled`` None inherits the tenant switch."""

    address: str
    display_name: str = ""
    licensed: bool = True
    shared: bool = False
    smtp_auth_disabled: bool | None = None
    password: str | None = None
    send_as: frozenset[str] = frozenset()


@dataclass(frozen=True)
class AppRegistration:
    """An Entra app registration plus its Exchange service principal (``mailboxes`` None = all)."""

    client_id: str
    display_name: str = ""
    client_secret: str | None = None
    certificate_pem: str | None = None
    permissions: frozenset[str] = frozenset()
    mailboxes: frozenset[str] | None = None
    public_client: bool = False


@dataclass(frozen=True)
class InboundConnector:
    """An OnPremises inbound connector: identifies a sender by IP range or TLS certificate name."""

    name: str
    sender_ip_ranges: tuple[IPNetwork, ...] = ()
    tls_sender_certificate_name: str | None = None
    enabled: bool = True


@dataclass(frozen=True)
class Limits:
    """Service limits (Exchange Online limits page); all configurable so tests can use small ones."""

    messages_per_minute: int = 30
    # The per-minute window itself, so tests can compress time (Exchange Online: 60 seconds).
    submission_window_seconds: int = 60
    recipients_per_day: int = 10000
    smtp_connections_per_mailbox: int = 3
    max_message_size: int = 35 * 1024 * 1024  # send (submission, Graph)
    max_receive_message_size: int = 36 * 1024 * 1024  # receive (the MX endpoint)
    max_recipients_per_message: int = 500
    graph_concurrent_per_mailbox: int = 4
    graph_requests_per_window: int = 10000
    graph_window_seconds: int = 600
    graph_max_request_bytes: int = 4 * 1024 * 1024
    token_lifetime: int = 3600
    # Graph message trace: 100 requests per 5-minute running window per tenant, list and details
    # sharing the quota (Exchange Team blog "Message Trace support using Graph API", Jan 2026;
    # learn.microsoft.com/graph/api/messagetracingroot-list-messagetraces, note).
    trace_requests_per_window: int = 100
    trace_window_seconds: int = 300
    # How long a new trace record says gettingStatus before its events show (Microsoft documents no
    # figure; 0 = at once). Tests set it to exercise a follower that waits for a final status.
    trace_status_delay_seconds: int = 0
    # What EHLO advertises as SIZE: Exchange Online advertises the organisation maximum (150 MB) while
    # the mailbox limit above is enforced at MAIL FROM SIZE= and after DATA.
    smtp_advertised_size: int = 157286400


@dataclass(frozen=True)
class Tenant:
    """One organisation: accepted domains, mailboxes, apps, connectors, switches and limits."""

    tenant_id: str
    name: str
    accepted_domains: tuple[str, ...]
    mailboxes: Mapping[str, Mailbox]
    apps: Mapping[str, AppRegistration]
    connectors: tuple[InboundConnector, ...] = ()
    smtp_auth_disabled: bool = False
    security_defaults: bool = False
    basic_auth_allowed: bool = False
    reject_direct_send: bool = False
    limits: Limits = field(default_factory=Limits)
    # After acceptance (tenant_mailflow): published SPF records, the public address Microsoft sees for
    # a peer, anti-spoofing and mail flow rules.
    spf_records: Mapping[str, str] = field(default_factory=dict)
    public_ips: Mapping[str, str] = field(default_factory=dict)
    rules: tuple[MailFlowRule, ...] = ()
    spoof_intelligence: bool = True
    spoof_action: SpoofAction = "junk"
    host: str = "127.0.0.1"
    submission_port: int = 0
    mx_port: int = 0
    http_port: int = 0

    def mailbox(self, address: str) -> Mailbox | None:
        """The mailbox with this primary address (case-insensitive), or None."""
        wanted = address.strip().lower()
        found = self.mailboxes.get(wanted)
        if found is not None:
            return found
        for mailbox in self.mailboxes.values():
            if mailbox.address.lower() == wanted:
                return mailbox
        return None

    def is_accepted_domain(self, domain: str) -> bool:
        """True if ``domain`` (case-insensitive) is one of the tenant's accepted domains."""
        wanted = domain.strip().lower().rstrip(".")
        return any(wanted == accepted.lower() for accepted in self.accepted_domains)

    def owns_name(self, name: str) -> bool:
        """True if a host name (e.g. a certificate's CN) is an accepted domain or below one."""
        wanted = name.strip().lower().rstrip(".").removeprefix("*.")
        return any(wanted == d.lower() or wanted.endswith("." + d.lower()) for d in self.accepted_domains)

    def is_internal_address(self, address: str) -> bool:
        """True if the address's domain is an accepted domain."""
        _, at, domain = address.rpartition("@")
        return bool(at) and self.is_accepted_domain(domain)

    def public_ip(self, peer: str) -> str:
        """The address Microsoft would see for a peer (``[public_ip]`` maps loopback to a NAT address)."""
        try:
            key = str(ipaddress.ip_address(peer))
        except ValueError:
            return peer
        return self.public_ips.get(key, key)

    def smtp_auth_enabled_for(self, mailbox: Mailbox) -> bool:
        """The effective SMTP AUTH switch: the mailbox setting if set, else the tenant's."""
        if mailbox.smtp_auth_disabled is not None:
            return not mailbox.smtp_auth_disabled
        return not self.smtp_auth_disabled


# ---------------------------------------------------------------------------------------------
# TOML loading: every problem is a ConfigError naming the key and the value.


def _get(table: Mapping[str, Any], key: str, where: str, kind: type, default: Any) -> Any:
    value = table.get(key, default)
    if value is default:
        return value
    # bool is an int subclass: refuse True for int fields and 1 for bool fields.
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}{key}", value, "Not a valid int.")
    if kind is not int and not isinstance(value, kind):
        raise ConfigError(f"{where}{key}", value, f"Not a valid {kind.__name__}.")
    return value


def _required_str(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}{key}", value, "A non-empty string is required.")
    return value


def _str_list(table: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{where}{key}", value, "Not a list of strings.")
    return list(value)


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}{key}", table[key], "Unknown key.")


def _mailbox(table: Mapping[str, Any], where: str) -> Mailbox:
    _check_keys(table, {f.name for f in fields(Mailbox)}, where)
    address = _required_str(table, "address", where)
    if "@" not in address:
        raise ConfigError(f"{where}address", address, "Not an email address.")
    disabled = table.get("smtp_auth_disabled")
    if disabled is not None and not isinstance(disabled, bool):
        raise ConfigError(f"{where}smtp_auth_disabled", disabled, "Must be true, false or absent.")
    return Mailbox(
        address=address.lower(),
        display_name=_get(table, "display_name", where, str, ""),
        licensed=_get(table, "licensed", where, bool, True),
        shared=_get(table, "shared", where, bool, False),
        smtp_auth_disabled=disabled,
        password=_get(table, "password", where, str, None),
        send_as=frozenset(a.lower() for a in _str_list(table, "send_as", where)),
    )


def _app(table: Mapping[str, Any], where: str, base_dir: Path) -> AppRegistration:
    _check_keys(table, {f.name for f in fields(AppRegistration)} | {"certificate_file"}, where)
    permissions = _str_list(table, "permissions", where)
    for permission in permissions:
        if permission not in KNOWN_PERMISSIONS:
            raise ConfigError(
                f"{where}permissions", permission, f"Unknown permission; use {sorted(KNOWN_PERMISSIONS)}."
            )
    certificate_pem = _get(table, "certificate_pem", where, str, None)
    certificate_file = _get(table, "certificate_file", where, str, None)
    if certificate_file is not None:
        try:
            certificate_pem = (base_dir / certificate_file).read_text(encoding="ascii")
        except OSError as exc:
            raise ConfigError(f"{where}certificate_file", certificate_file, str(exc)) from exc
    mailboxes = table.get("mailboxes")
    return AppRegistration(
        client_id=_required_str(table, "client_id", where),
        display_name=_get(table, "display_name", where, str, ""),
        client_secret=_get(table, "client_secret", where, str, None),
        certificate_pem=certificate_pem,
        permissions=frozenset(permissions),
        mailboxes=None
        if mailboxes is None
        else frozenset(a.lower() for a in _str_list(table, "mailboxes", where)),
        public_client=_get(table, "public_client", where, bool, False),
    )


def _connector(table: Mapping[str, Any], where: str) -> InboundConnector:
    _check_keys(table, {f.name for f in fields(InboundConnector)}, where)
    ranges: list[IPNetwork] = []
    for text in _str_list(table, "sender_ip_ranges", where):
        try:
            ranges.append(ipaddress.ip_network(text, strict=False))
        except ValueError as exc:
            raise ConfigError(f"{where}sender_ip_ranges", text, "Not an IP address or network.") from exc
    cert_name = _get(table, "tls_sender_certificate_name", where, str, None)
    if not ranges and cert_name is None:
        raise ConfigError(
            f"{where}name", table.get("name"), "Needs sender_ip_ranges or tls_sender_certificate_name."
        )
    return InboundConnector(
        name=_required_str(table, "name", where),
        sender_ip_ranges=tuple(ranges),
        tls_sender_certificate_name=cert_name.lower() if cert_name else None,
        enabled=_get(table, "enabled", where, bool, True),
    )


_MAY_BE_ZERO = frozenset({"trace_status_delay_seconds"})


def _limits(table: Mapping[str, Any]) -> Limits:
    _check_keys(table, {f.name for f in fields(Limits)}, "limits.")
    values: dict[str, int] = {}
    for f in fields(Limits):
        if f.name in table:
            value = _get(table, f.name, "limits.", int, None)
            if value < 0 or (value == 0 and f.name not in _MAY_BE_ZERO):
                raise ConfigError(f"limits.{f.name}", value, "Must be a positive integer.")
            values[f.name] = value
    return Limits(**values)


def _tables(data: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ConfigError(key, value, f"Use [[{key}]] tables.")
    return value


def tenant_from_mapping(data: Mapping[str, Any], *, base_dir: Path | None = None) -> Tenant:
    """Build and validate a Tenant from parsed TOML data (relative file names are under ``base_dir``)."""
    top = {f.name for f in fields(Tenant)} | {"mailbox", "app", "connector", "spf", "public_ip", "rule"}
    _check_keys(data, top - {"mailboxes", "apps", "connectors", "spf_records", "public_ips", "rules"}, "")
    domains = [d.lower() for d in _str_list(data, "accepted_domains", "")]
    if not domains:
        raise ConfigError("accepted_domains", data.get("accepted_domains"), "At least one domain is needed.")
    mailboxes: dict[str, Mailbox] = {}
    for index, table in enumerate(_tables(data, "mailbox")):
        mailbox = _mailbox(table, f"mailbox[{index}].")
        if not any(mailbox.address.endswith("@" + d) for d in domains):
            raise ConfigError(f"mailbox[{index}].address", mailbox.address, "Not in an accepted domain.")
        mailboxes[mailbox.address] = mailbox
    apps: dict[str, AppRegistration] = {}
    for index, table in enumerate(_tables(data, "app")):
        app = _app(table, f"app[{index}].", base_dir or Path.cwd())
        apps[app.client_id] = app
    connectors = tuple(_connector(t, f"connector[{i}].") for i, t in enumerate(_tables(data, "connector")))
    limits_table = data.get("limits", {})
    if not isinstance(limits_table, dict):
        raise ConfigError("limits", limits_table, "Use a [limits] table.")
    ports: dict[str, int] = {}
    for key in ("submission_port", "mx_port", "http_port"):
        port = _get(data, key, "", int, 0)
        if not 0 <= port <= 65535:
            raise ConfigError(key, port, "Not a TCP port (0-65535).")
        ports[key] = port
    mail_flow = mail_flow_from_mapping(data)
    for index, rule in enumerate(mail_flow.rules):
        target = rule.redirect_to
        if target is not None and any(target.endswith("@" + d) for d in domains) and target not in mailboxes:
            raise ConfigError(f"rule[{index}].redirect_to", target, "No such mailbox in the tenant.")
    host = _get(data, "host", "", str, "127.0.0.1")
    try:
        if not ipaddress.ip_address(host).is_loopback:
            raise ConfigError("host", host, "The sandbox listens on loopback addresses only.")
    except ValueError as exc:
        raise ConfigError("host", host, "Not an IP address.") from exc
    return Tenant(
        tenant_id=_required_str(data, "tenant_id", ""),
        name=_required_str(data, "name", ""),
        accepted_domains=tuple(domains),
        mailboxes=mailboxes,
        apps=apps,
        connectors=connectors,
        smtp_auth_disabled=_get(data, "smtp_auth_disabled", "", bool, False),
        security_defaults=_get(data, "security_defaults", "", bool, False),
        basic_auth_allowed=_get(data, "basic_auth_allowed", "", bool, False),
        reject_direct_send=_get(data, "reject_direct_send", "", bool, False),
        limits=_limits(limits_table),
        spf_records=mail_flow.spf_records,
        public_ips=mail_flow.public_ips,
        rules=mail_flow.rules,
        spoof_intelligence=mail_flow.spoof_intelligence,
        spoof_action=mail_flow.spoof_action,
        host=host,
        **ports,
    )


def load_tenant(path: Path) -> Tenant:
    """Read a tenant TOML file. Raises ConfigError naming the key and the value."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("tenant", str(path), f"Cannot read the file: {exc.strerror}.") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("tenant", str(path), f"Not valid TOML: {exc}.") from exc
    return tenant_from_mapping(data, base_dir=path.parent)


def example_tenant() -> Tenant:
    """The documented built-in example tenant (contoso.test)."""
    return load_tenant(EXAMPLE_TENANT_PATH)
