"""``[[transport]]`` and ``[[route]]``: the upstreams (defaults per type; Microsoft 365's specifics in
``M365Options``) and which mail goes to which."""

from __future__ import annotations

from typing import Literal, cast

from relay365.errors import ConfigError
from relay365.netdns import parse_nameserver
from relay365.settings.model import (
    UPSTREAM_TLS_MODES,
    M365Options,
    RouteSettings,
    TransportSettings,
    UpstreamTls,
)
from relay365.settings.table import Table, port_number, sender_pattern

TYPE_DEFAULTS: dict[str, tuple[str, int, str]] = {
    # type: (host, port, tls); "" host = the recipient domain's MX record (exchange-online.md)
    "smarthost": ("127.0.0.1", 25, "required"),
    "submission": ("smtp.office365.com", 587, "required"),
    "direct_send": ("", 25, "opportunistic"),
    "connector": ("", 25, "required"),
    "graph": ("", 443, "required"),
}


def transport(t: Table) -> TransportSettings:
    name = t.get("name", str, "")
    if not name:
        raise ConfigError(t.key("name"), name, "Every transport needs a name.")
    kind = t.choice("type", tuple(TYPE_DEFAULTS), "smarthost")
    host, port, tls = TYPE_DEFAULTS[kind]
    s = TransportSettings(
        name=name,
        type=kind,
        host=t.get("host", str, host),
        port=port_number(t, "port", port),
        tls=cast(UpstreamTls, t.choice("tls", UPSTREAM_TLS_MODES, tls)),
        verify=t.get("verify", bool, True),
        ca_file=t.existing_file("ca_file"),
        username=t.opt("username", str),
        password=t.secret("password"),
        client_cert_file=t.existing_file("client_cert_file"),
        client_key_file=t.existing_file("client_key_file"),
        max_sessions=t.positive("max_sessions", int, 4 if kind == "graph" else 3),
        timeout=t.positive("timeout", float, 60.0),
        helo_name=t.opt("helo_name", str),
        m365=m365_options(t, kind) if kind != "smarthost" else M365Options(),
    )
    if s.password is not None and s.username is None:
        raise ConfigError(t.key("username"), None, "A password needs a username.")
    t.done()
    return s


def m365_options(t: Table, kind: str) -> M365Options:
    o = M365Options(
        mailbox=t.opt("mailbox", str),
        auth=cast(Literal["xoauth2", "basic"], t.choice("auth", ("xoauth2", "basic"), "xoauth2")),
        tenant=t.opt("tenant", str),
        client_id=t.opt("client_id", str),
        client_secret=t.secret("client_secret"),
        certificate_file=t.existing_file("certificate_file"),
        certificate_thumbprint=t.opt("certificate_thumbprint", str),
        authority=t.get("authority", str, "https://login.microsoftonline.com"),
        authority_ca_file=t.existing_file("authority_ca_file"),
        token_cache=t.path("token_cache"),
        delegated_user=t.opt("delegated_user", str),
        accepted_domains=tuple(d.lower().lstrip("@") for d in t.strings("accepted_domains")),
        nameservers=t.strings("nameservers"),
        graph_url=t.get("graph_url", str, "https://graph.microsoft.com/v1.0").rstrip("/"),
        save_to_sent_items=t.get("save_to_sent_items", bool, True),
        messages_per_minute=t.positive("messages_per_minute", int, 30),
        recipients_per_day=t.positive("recipients_per_day", int, 10_000),
        connections=t.positive("connections", int, 4 if kind == "graph" else 3),
        pacing_window=t.positive("pacing_window", float, 60.0),
    )
    ports = {parse_nameserver(ns, key=t.key("nameservers"))[1] for ns in o.nameservers}
    if len(ports) > 1:
        raise ConfigError(
            t.key("nameservers"), list(o.nameservers), "All name servers must use the same port."
        )
    needs_mailbox = kind == "graph" or (kind == "submission")
    if needs_mailbox and not o.mailbox:
        raise ConfigError(t.key("mailbox"), None, f"A {kind} transport sends as a mailbox; name it.")
    oauth = kind == "graph" or (kind == "submission" and o.auth == "xoauth2")
    if oauth and not (o.tenant and o.client_id):
        raise ConfigError(t.key("client_id"), o.client_id, "OAuth needs tenant and client_id.")
    if kind == "direct_send" and not o.accepted_domains:
        raise ConfigError(
            t.key("accepted_domains"), [], "Direct Send only reaches the tenant's own domains; list them."
        )
    return o


def route(t: Table, transports: set[str]) -> RouteSettings:
    s = RouteSettings(
        name=t.get("name", str, t.key("")),
        transport=t.get("transport", str, ""),
        recipient_domains=tuple(d.lower().lstrip("@") for d in t.strings("recipient_domains")),
        senders=tuple(sender_pattern(t.key("senders"), v) for v in t.strings("senders")),
        devices=t.strings("devices"),
        max_size=t.opt("max_size", int),
        fallbacks=t.strings("fallbacks"),
    )
    for key, name in [("transport", s.transport), *(("fallbacks", f) for f in s.fallbacks)]:
        if name not in transports:
            raise ConfigError(t.key(key), name, "No transport of that name.")
    t.done()
    return s
