"""The sections of relay365.toml besides transports and routes (``transports.py``): each read from its
table into its dataclass (model.py), with the checks that need more than one key; the PostgreSQL URL
checks (``redact_url``, ``check_postgres_url``) that the spool reuses."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal, cast
from urllib.parse import parse_qsl, urlsplit

from relay365.errors import ConfigError
from relay365.logformats import LOG_FORMATS, LogFormat
from relay365.settings.model import (
    DEFAULT_MAX_HEADER_SIZE,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_RECIPIENTS,
    LISTENER_TLS_MODES,
    TLS_VERSIONS,
    AdminSettings,
    DeliverySettings,
    DeviceSettings,
    ListenerSettings,
    ServerSettings,
    SpoolSettings,
    TlsMode,
    TlsVersion,
    TracingSettings,
    TrackingSettings,
    TransportSettings,
)
from relay365.settings.table import Table, network, port_number, sender_pattern

_SERVER = ServerSettings()


def server(t: Table) -> ServerSettings:
    s = ServerSettings(
        hostname=t.get("hostname", str, _SERVER.hostname),
        spool_dir=t.path("spool_dir") or (t.base / _SERVER.spool_dir),
        log_level=t.choice("log_level", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO"),
        log_format=cast(LogFormat, t.choice("log_format", LOG_FORMATS, "auto")),
        max_connections=t.positive("max_connections", int, _SERVER.max_connections),
        max_connections_per_ip=t.positive("max_connections_per_ip", int, _SERVER.max_connections_per_ip),
        auth_failures_before_block=t.positive(
            "auth_failures_before_block", int, _SERVER.auth_failures_before_block
        ),
        auth_block_seconds=t.positive("auth_block_seconds", float, 300.0),
        auth_failure_delay=t.get("auth_failure_delay", float, 1.0),
        shutdown_grace=t.positive("shutdown_grace", float, _SERVER.shutdown_grace),
        spool_min_free=t.get("spool_min_free", int, _SERVER.spool_min_free),
        workers=t.positive("workers", int, os.cpu_count() or 1),
    )
    if s.spool_min_free < 0:
        raise ConfigError(t.key("spool_min_free"), s.spool_min_free, "Must be 0 or more (bytes).")
    t.done()
    return s


def listener(t: Table) -> ListenerSettings:
    tls = cast(TlsMode, t.choice("tls", LISTENER_TLS_MODES, "starttls"))
    legacy = t.get("legacy", bool, False)
    min_tls = cast(TlsVersion, t.choice("min_tls_version", TLS_VERSIONS, "1.2"))
    if min_tls in ("1.0", "1.1") and not legacy:
        raise ConfigError(
            t.key("min_tls_version"), min_tls, "TLS 1.0/1.1 needs 'legacy = true' on this listener."
        )
    cert, key = t.existing_file("cert_file"), t.existing_file("key_file")
    if (cert is None) != (key is None):
        raise ConfigError(t.key("cert_file"), str(cert), "Give both cert_file and key_file.")
    s = ListenerSettings(
        name=t.get("name", str, t.key("").rstrip(".")),
        address=t.get("address", str, "127.0.0.1"),
        port=port_number(t, "port", 2525),
        tls=tls,
        min_tls_version=min_tls,
        legacy=legacy,
        cert_file=cert,
        key_file=key,
        auth=t.get("auth", bool, True),
        allow_plaintext_auth=t.get("allow_plaintext_auth", bool, False),
        client_ca_file=t.existing_file("client_ca_file"),
        idle_timeout=t.positive("idle_timeout", float, 300.0),
        data_timeout=t.positive("data_timeout", float, 600.0),
        bare_newlines=cast(
            Literal["reject", "normalize"],
            t.choice("bare_newlines", ("reject", "normalize"), "reject"),
        ),
        max_message_size=t.positive("max_message_size", int, DEFAULT_MAX_MESSAGE_SIZE),
        max_recipients=t.positive("max_recipients", int, DEFAULT_MAX_RECIPIENTS),
        max_header_size=t.positive("max_header_size", int, DEFAULT_MAX_HEADER_SIZE),
    )
    try:
        ipaddress.ip_address(s.address)
    except ValueError:
        raise ConfigError(t.key("address"), s.address, "Not an IP address.") from None
    t.done()
    return s


def device(t: Table) -> DeviceSettings:
    name = t.get("name", str, "")
    if not name:
        raise ConfigError(t.key("name"), name, "Every device needs a name.")
    pw = t.opt("password_hash", str)
    if pw is not None and not pw.startswith("$argon2id$"):
        raise ConfigError(
            t.key("password_hash"),
            "***",
            "Not an Argon2id hash: run 'relay365 device passwd NAME'.",
        )
    s = DeviceSettings(
        name=name,
        ip_allow=tuple(network(t.key("ip_allow"), v) for v in t.strings("ip_allow")),
        username=t.opt("username", str) or (name if pw else None),
        password_hash=pw,
        client_cert_fingerprints=tuple(
            v.lower().removeprefix("sha256:").replace(":", "") for v in t.strings("client_cert_fingerprints")
        ),
        client_cert_subjects=t.strings("client_cert_subjects"),
        allowed_senders=tuple(
            sender_pattern(t.key("allowed_senders"), v) for v in t.strings("allowed_senders", ("*",))
        ),
        rewrite_sender=t.opt("rewrite_sender", str),
        allowed_recipient_domains=tuple(
            d.lower().lstrip("@") for d in t.strings("allowed_recipient_domains")
        ),
        max_message_size=t.opt("max_message_size", int),
        max_recipients=t.opt("max_recipients", int),
        max_messages_per_minute=t.opt("max_messages_per_minute", int),
        listeners=t.strings("listeners"),
    )
    if s.rewrite_sender is not None and "@" not in s.rewrite_sender:
        raise ConfigError(t.key("rewrite_sender"), s.rewrite_sender, "Not an email address.")
    for k in ("max_message_size", "max_recipients", "max_messages_per_minute"):
        v = getattr(s, k)
        if v is not None and v <= 0:
            raise ConfigError(t.key(k), v, "Must be greater than 0.")
    t.done()
    return s


def delivery(t: Table) -> DeliverySettings:
    s = DeliverySettings(
        concurrency=t.positive("concurrency", int, 10),
        min_backoff=t.positive("min_backoff", float, 300.0),
        max_backoff=t.positive("max_backoff", float, 4000.0),
        queue_lifetime=t.positive("queue_lifetime", float, 5 * 86400.0),
        poll_interval=t.positive("poll_interval", float, 30.0),
        lease=t.positive("lease", float, 60.0),
    )
    if s.max_backoff < s.min_backoff:
        raise ConfigError(t.key("max_backoff"), s.max_backoff, "Must be at least min_backoff.")
    t.done()
    return s


SPOOL_SCHEMES = ("sqlite:", "memory:", "postgresql://", "postgres://")


def redact_url(url: str) -> str:
    """A URL fit for a message or a log line: a password in it (user:password@ or ?password=) masked."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    head, q, query = rest.partition("?")
    authority, slash, tail = head.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if at and ":" in userinfo:
        head = f"{userinfo.split(':', 1)[0]}:***@{host}{slash}{tail}"
    if q:
        pairs = [p.partition("=") for p in query.split("&")]
        query = "&".join(f"{k}=***" if k.lower() == "password" else f"{k}{eq}{v}" for k, eq, v in pairs)
    return f"{scheme}{sep}{head}{q}{query}"


def check_postgres_url(url: str, *, key: str = "spool.url") -> None:
    """``ConfigError`` for a PostgreSQL URL that carries a password or names no server."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or (not parts.netloc and not parts.path.strip("/")):
        raise ConfigError(key, redact_url(url), "Use postgresql://user@host:port/database.")
    try:
        has_password = parts.password is not None
    except ValueError:
        has_password = False
    if has_password or any(k.lower() == "password" for k, _ in parse_qsl(parts.query)):
        raise ConfigError(
            key,
            redact_url(url),
            "Do not put the password in the URL: use [spool] password_env or password_file, or"
            " PGPASSWORD / ~/.pgpass.",
        )


def spool(t: Table, server: ServerSettings) -> SpoolSettings:
    """The URL as given, a relative ``sqlite:`` path made absolute against the config's folder;
    which backends this build has is the spool factory's answer (spool/factory.py). A PostgreSQL
    URL with a password in it is refused (and the password masked in the message)."""
    url = t.get("url", str, "").strip()
    if not url or url == "sqlite:":
        url = f"sqlite:{server.spool_dir}"
    elif url.startswith("sqlite:"):
        path = Path(url.removeprefix("sqlite:").removeprefix("//")).expanduser()
        url = f"sqlite:{path if path.is_absolute() else t.base / path}"
    elif not url.startswith(SPOOL_SCHEMES):
        raise ConfigError(t.key("url"), url, "Use sqlite:PATH, memory: or postgresql://user@host/db.")
    postgres = url.startswith(("postgresql://", "postgres://"))
    if postgres:
        check_postgres_url(url, key=t.key("url"))
    d = SpoolSettings()
    s = SpoolSettings(
        url=url,
        password=t.secret("password"),
        pool_size=t.positive("pool_size", int, d.pool_size),
        connect_timeout=t.positive("connect_timeout", float, d.connect_timeout),
    )
    if s.password is not None and not postgres:
        raise ConfigError(t.key("password_env"), "***", "A password is for a postgresql:// spool only.")
    t.done()
    return s


def admin(t: Table) -> AdminSettings:
    d = AdminSettings()
    s = AdminSettings(
        address=t.get("address", str, d.address),
        port=t.opt("port", int),
        tls=t.get("tls", bool, d.tls),
        cert_file=t.existing_file("cert_file"),
        key_file=t.existing_file("key_file"),
        allowed_hosts=tuple(h.lower() for h in t.strings("allowed_hosts")),
        users_file=t.path("users_file"),
        open_metrics=t.get("open_metrics", bool, d.open_metrics),
        session_hours=t.positive("session_hours", float, d.session_hours),
        login_failures=t.positive("login_failures", int, d.login_failures),
        lockout_seconds=t.positive("lockout_seconds", float, d.lockout_seconds),
    )
    if (s.cert_file is None) != (s.key_file is None):
        raise ConfigError(
            t.key("cert_file"), str(s.cert_file or s.key_file), "Set both cert_file and key_file."
        )
    try:
        ipaddress.ip_address(s.address)
    except ValueError:
        raise ConfigError(t.key("address"), s.address, "Not an IP address.") from None
    if s.port is not None and not 0 <= s.port <= 65535:
        raise ConfigError(t.key("port"), s.port, "Must be from 0 to 65535 (0: any free port).")
    t.done()
    return s


def tracking(t: Table) -> TrackingSettings:
    d = TrackingSettings()
    s = TrackingSettings(
        enabled=t.get("enabled", bool, d.enabled),
        retention_days=t.positive("retention_days", float, d.retention_days),
        path=t.path("path"),
        log_events=t.get("log_events", bool, d.log_events),
    )
    t.done()
    return s


# Graph's message trace keeps 90 days (learn.microsoft.com/graph/api/messagetracingroot-list-messagetraces).
TRACE_MAX_HORIZON = 90 * 86400.0


def tracing(t: Table, transports: tuple[TransportSettings, ...]) -> TracingSettings:
    d = TracingSettings()
    s = TracingSettings(
        enabled=t.get("enabled", bool, d.enabled),
        horizon=t.positive("horizon", float, d.horizon),
        poll_interval=t.positive("poll_interval", float, d.poll_interval),
        app=t.opt("app", str),
        transports=t.strings("transports"),
    )
    if not 600 <= s.horizon <= TRACE_MAX_HORIZON:
        raise ConfigError(t.key("horizon"), s.horizon, "Must be from 600 seconds to 90 days (7776000).")
    by_name = {x.name: x for x in transports}
    for name in s.transports:
        if name not in by_name:
            raise ConfigError(t.key("transports"), name, "No transport of that name.")
    if s.app is not None:
        app = by_name.get(s.app)
        if app is None:
            raise ConfigError(t.key("app"), s.app, "No transport of that name.")
        secret = app.m365.client_secret or app.m365.certificate_file
        if app.type not in ("submission", "graph") or not secret:
            raise ConfigError(
                t.key("app"), s.app, "Name a submission or graph transport with app-only credentials"
                " (client_secret_env/_file or certificate_file).",
            )  # fmt: skip
    t.done()
    return s
