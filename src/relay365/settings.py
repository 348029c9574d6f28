"""relay365.toml, parsed once at the edge into frozen, typed settings.

Every error names the key and the bad value (``ConfigError``). Secrets never need to sit in the file:
device passwords are Argon2id hashes, upstream secrets come from ``*_env`` (an environment variable)
or ``*_file`` (a file readable only by the service user, mode 0600).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import parse_qsl, urlsplit

from relay365.errors import ConfigError
from relay365.logformats import LOG_FORMATS, LogFormat
from relay365.netdns import parse_nameserver

TlsMode = Literal["none", "starttls", "starttls-required", "implicit"]
UpstreamTls = Literal["none", "opportunistic", "required", "implicit"]
TlsVersion = Literal["1.0", "1.1", "1.2", "1.3"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LISTENER_TLS_MODES: tuple[TlsMode, ...] = ("none", "starttls", "starttls-required", "implicit")
UPSTREAM_TLS_MODES: tuple[UpstreamTls, ...] = ("none", "opportunistic", "required", "implicit")
TLS_VERSIONS: tuple[TlsVersion, ...] = ("1.0", "1.1", "1.2", "1.3")
# Exchange Online's default maximum send size is 35 MB (exchange-online.md, "Message size").
DEFAULT_MAX_MESSAGE_SIZE = 35 * 1024 * 1024
# Exchange Online's default recipients per message (exchange-online.md, "Message size").
DEFAULT_MAX_RECIPIENTS = 500
# Exchange Online limits, "Message limits": message header size limit 256 KB (a bigger header section
# is refused by Microsoft with an NDR, so relay365 refuses it while the device is still connected).
DEFAULT_MAX_HEADER_SIZE = 256 * 1024
NULL_SENDER = "<>"  # the null reverse-path (RFC 5321 4.5.5) in allowed_senders and route senders


@dataclass(frozen=True, slots=True)
class ServerSettings:
    hostname: str = "relay365.local"
    spool_dir: Path = Path("var/spool")
    log_level: str = "INFO"
    log_format: LogFormat = "auto"  # auto: journal lines under systemd, text otherwise; or json
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    auth_failures_before_block: int = 5
    auth_block_seconds: float = 300.0
    auth_failure_delay: float = 1.0
    shutdown_grace: float = 30.0  # SIGTERM: seconds a session in DATA gets to finish its message
    # Free space kept for the queue's own bookkeeping (delivery outcomes, DSNs): below it devices
    # get 452 4.3.1 (Postfix: queue_minfree; RFC 1870 6.1 for an announced SIZE).
    spool_min_free: int = 64 * 1024 * 1024
    # Ingress processes (service/workers.py): the supervisor itself and ``workers - 1`` more sharing its
    # listening sockets. The config's default is the CPU count; 1 keeps one process.
    workers: int = 1


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    name: str
    address: str = "127.0.0.1"
    port: int = 2525
    tls: TlsMode = "starttls"
    min_tls_version: TlsVersion = "1.2"
    legacy: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    auth: bool = True
    allow_plaintext_auth: bool = False
    client_ca_file: Path | None = None
    idle_timeout: float = 300.0
    data_timeout: float = 600.0
    bare_newlines: Literal["reject", "normalize"] = "reject"
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_recipients: int = DEFAULT_MAX_RECIPIENTS
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE


@dataclass(frozen=True, slots=True)
class DeviceSettings:
    name: str
    ip_allow: tuple[Network, ...] = ()
    username: str | None = None
    password_hash: str | None = None
    client_cert_fingerprints: tuple[str, ...] = ()
    client_cert_subjects: tuple[str, ...] = ()
    allowed_senders: tuple[str, ...] = ("*",)
    rewrite_sender: str | None = None
    allowed_recipient_domains: tuple[str, ...] = ()
    max_message_size: int | None = None
    max_recipients: int | None = None
    max_messages_per_minute: int | None = None
    listeners: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    concurrency: int = 10
    min_backoff: float = 300.0  # Postfix minimal_backoff_time
    max_backoff: float = 4000.0  # Postfix maximal_backoff_time
    queue_lifetime: float = 5 * 86400.0  # Postfix maximal_queue_lifetime
    poll_interval: float = 30.0
    # How long a claim on a message lasts (renewed while its delivery runs): after a process died
    # without a trace, another one delivers its messages this long after the last renewal.
    lease: float = 60.0


@dataclass(frozen=True, slots=True)
class SpoolSettings:
    """``[spool] url``: where the queue lives. ``sqlite:PATH`` (the default: ``server.spool_dir``),
    ``memory:`` (tests only: nothing survives a restart) or ``postgresql://user@host:port/db`` (a
    queue several relays share). PostgreSQL's password comes from ``password_env``/``password_file``
    or libpq's ``PGPASSWORD``/``~/.pgpass``, never from the URL."""

    url: str = ""
    password: SecretRef | None = None
    pool_size: int = 10  # PostgreSQL connections per relay process (and two more of its own)
    connect_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """The admin console and its API (and /metrics, /api/health); off unless a port is set.
    Loopback by default; accounts live in ``users_file`` (``relay365 admin passwd NAME``)."""

    address: str = "127.0.0.1"
    port: int | None = None
    tls: bool = False  # HTTPS: cert_file/key_file, or a self-signed pair made under the spool
    cert_file: Path | None = None
    key_file: Path | None = None
    allowed_hosts: tuple[str, ...] = ()  # Host names besides the address, localhost and 127.0.0.1
    users_file: Path | None = None  # default: <spool_dir>/admin-users.json
    open_metrics: bool = True  # /metrics without login for clients on loopback
    session_hours: float = 12.0
    login_failures: int = 5  # per account and per address, then a lockout
    lockout_seconds: float = 900.0


@dataclass(frozen=True, slots=True)
class TrackingSettings:
    """The tracking log (message trace and audit log) in its own database beside the queue."""

    enabled: bool = True
    retention_days: float = 30.0
    path: Path | None = None  # default: <spool_dir>/tracking.db
    log_events: bool = True  # also one structured log line per event


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """``[tracing]``: follow delivered mail into Microsoft 365's message trace (``relay365.tracing``).
    ``app``: a submission or graph transport whose app registration (app-only credentials) reads the
    trace for transports that have none (direct_send, connector); ``transports``: which transports to
    follow (empty: every Microsoft 365 transport that has an app)."""

    enabled: bool = True
    horizon: float = 2 * 86400.0  # give up on a recipient without a final status after this long
    poll_interval: float = 300.0
    app: str | None = None
    transports: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SecretRef:
    """Where a secret comes from; the value itself is only read by ``relay365.secrets``."""

    key: str
    env: str | None = None
    file: Path | None = None


@dataclass(frozen=True, slots=True)
class M365Options:
    """Microsoft 365 specifics of the submission, direct_send, connector and graph transports."""

    mailbox: str | None = None  # the login / sending mailbox (submission, graph)
    auth: Literal["xoauth2", "basic"] = "xoauth2"
    tenant: str | None = None  # directory (tenant) id or domain
    client_id: str | None = None
    client_secret: SecretRef | None = None
    certificate_file: Path | None = None  # PEM with private key and certificate
    certificate_thumbprint: str | None = None
    authority: str = "https://login.microsoftonline.com"  # national clouds and the sandbox differ
    authority_ca_file: Path | None = None
    token_cache: Path | None = None  # delegated sign-in (relay365 login): refresh token, 0600
    delegated_user: str | None = None
    accepted_domains: tuple[str, ...] = ()  # the tenant's domains (direct_send: the only ones allowed)
    nameservers: tuple[str, ...] = ()  # resolver for MX lookups ("ip" or "ip:port"); default: system
    graph_url: str = "https://graph.microsoft.com/v1.0"
    save_to_sent_items: bool = True
    messages_per_minute: int = 30  # Exchange Online SMTP AUTH: 30 messages/minute per mailbox
    recipients_per_day: int = 10_000  # Exchange Online: 10,000 recipients per rolling 24 hours
    connections: int = 3  # SMTP AUTH: 3 concurrent connections per mailbox; Graph: 4 requests
    pacing_window: float = 60.0


@dataclass(frozen=True, slots=True)
class TransportSettings:
    name: str
    type: str
    host: str = "127.0.0.1"
    port: int = 25
    tls: UpstreamTls = "required"
    verify: bool = True
    ca_file: Path | None = None
    username: str | None = None
    password: SecretRef | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    max_sessions: int = 3
    timeout: float = 60.0
    helo_name: str | None = None
    m365: M365Options = field(default_factory=M365Options)


@dataclass(frozen=True, slots=True)
class RouteSettings:
    name: str
    transport: str
    recipient_domains: tuple[str, ...] = ()
    senders: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    max_size: int | None = None
    fallbacks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings
    listeners: tuple[ListenerSettings, ...]
    devices: tuple[DeviceSettings, ...]
    delivery: DeliverySettings
    transports: tuple[TransportSettings, ...]
    routes: tuple[RouteSettings, ...]
    source: Path | None = None
    admin: AdminSettings = AdminSettings()
    tracking: TrackingSettings = TrackingSettings()
    spool: SpoolSettings = SpoolSettings()
    tracing: TracingSettings = TracingSettings()

    def transport(self, name: str) -> TransportSettings:
        for t in self.transports:
            if t.name == name:
                return t
        raise KeyError(name)


T = TypeVar("T")


class _Table:
    """A TOML table that remembers its dotted path, so every error names the full key."""

    def __init__(self, data: Mapping[str, Any], path: str, base: Path) -> None:
        self._data = dict(data)
        self._path = path
        self._base = base
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def get(self, name: str, typ: type[T], default: T) -> T:
        self._used.add(name)
        if name not in self._data:
            return default
        value = self._data[name]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(self.key(name), value, f"Not a valid {typ.__name__}.")
        return value

    def opt(self, name: str, typ: type[T]) -> T | None:
        self._used.add(name)
        if name not in self._data or self._data[name] in ("", None):
            return None
        return self.get(name, typ, cast(T, None))

    def positive(self, name: str, typ: type[T], default: T) -> T:
        value = self.get(name, typ, default)
        if cast(float, value) <= 0:
            raise ConfigError(self.key(name), value, "Must be greater than 0.")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(name, str, default)
        if value not in choices:
            raise ConfigError(self.key(name), value, f"Must be one of: {', '.join(choices)}.")
        return value

    def strings(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(name, list, list(default))
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise ConfigError(f"{self.key(name)}[{i}]", item, "Not a non-empty string.")
        return tuple(str(v).strip() for v in value)

    def path(self, name: str) -> Path | None:
        value = self.opt(name, str)
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self._base / p)

    def existing_file(self, name: str) -> Path | None:
        p = self.path(name)
        if p is not None and not p.is_file():
            raise ConfigError(self.key(name), str(p), "No such file.")
        return p

    def table(self, name: str) -> _Table:
        value = self.get(name, dict, {})
        return _Table(value, self.key(name), self._base)

    def tables(self, name: str) -> list[_Table]:
        value = self.get(name, list, [])
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise ConfigError(f"{self.key(name)}[{i}]", item, "Not a table.")
            out.append(_Table(item, f"{self.key(name)}[{i}]", self._base))
        return out

    def secret(self, name: str) -> SecretRef | None:
        """``name_env`` or ``name_file``; a clear-text ``name`` is refused."""
        if name in self._data:
            raise ConfigError(
                self.key(name), "***", f"Put the secret in {name}_env or {name}_file, not the file."
            )
        env = self.opt(f"{name}_env", str)
        file = self.path(f"{name}_file")
        if env and file:
            raise ConfigError(self.key(f"{name}_env"), env, f"Give {name}_env or {name}_file, not both.")
        if env is None and file is None:
            return None
        return SecretRef(key=self.key(name), env=env, file=file)

    def done(self, *, extra_ok: bool = False) -> dict[str, Any]:
        unknown = {k: v for k, v in self._data.items() if k not in self._used}
        if unknown and not extra_ok:
            k = sorted(unknown)[0]
            raise ConfigError(self.key(k), unknown[k], "Unknown key.")
        return unknown


def _network(key: str, value: str) -> Network:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(key, value, "Not an IP address or CIDR network.") from None


def _port(t: _Table, name: str, default: int) -> int:
    port = t.get(name, int, default)
    if not 0 <= port <= 65535:
        raise ConfigError(t.key(name), port, "Not a TCP port (0-65535).")
    return port


def _sender_pattern(key: str, value: str) -> str:
    """An address, ``@domain``, ``*`` (any sender, the null sender included) or ``<>`` (the null
    sender only)."""
    v = value.lower()
    if v in ("*", NULL_SENDER) or (v.startswith("@") and "." in v) or ("@" in v and not v.startswith("@")):
        return v
    raise ConfigError(key, value, "Use an address, '@domain', '<>' (the null sender) or '*'.")


_SERVER = ServerSettings()


def _server(t: _Table) -> ServerSettings:
    s = ServerSettings(
        hostname=t.get("hostname", str, _SERVER.hostname),
        spool_dir=t.path("spool_dir") or (t._base / _SERVER.spool_dir),
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


def _listener(t: _Table) -> ListenerSettings:
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
        port=_port(t, "port", 2525),
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


def _device(t: _Table) -> DeviceSettings:
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
        ip_allow=tuple(_network(t.key("ip_allow"), v) for v in t.strings("ip_allow")),
        username=t.opt("username", str) or (name if pw else None),
        password_hash=pw,
        client_cert_fingerprints=tuple(
            v.lower().removeprefix("sha256:").replace(":", "") for v in t.strings("client_cert_fingerprints")
        ),
        client_cert_subjects=t.strings("client_cert_subjects"),
        allowed_senders=tuple(
            _sender_pattern(t.key("allowed_senders"), v) for v in t.strings("allowed_senders", ("*",))
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


def _delivery(t: _Table) -> DeliverySettings:
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


def _spool(t: _Table, server: ServerSettings) -> SpoolSettings:
    """The URL as given, a relative ``sqlite:`` path made absolute against the config's folder;
    which backends this build has is the spool factory's answer (spool/factory.py). A PostgreSQL
    URL with a password in it is refused (and the password masked in the message)."""
    url = t.get("url", str, "").strip()
    if not url or url == "sqlite:":
        url = f"sqlite:{server.spool_dir}"
    elif url.startswith("sqlite:"):
        path = Path(url.removeprefix("sqlite:").removeprefix("//")).expanduser()
        url = f"sqlite:{path if path.is_absolute() else t._base / path}"
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


def _admin(t: _Table) -> AdminSettings:
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


def _tracking(t: _Table) -> TrackingSettings:
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


def _tracing(t: _Table, transports: tuple[TransportSettings, ...]) -> TracingSettings:
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


_TYPE_DEFAULTS: dict[str, tuple[str, int, str]] = {
    # type: (host, port, tls); "" host = the recipient domain's MX record (exchange-online.md)
    "smarthost": ("127.0.0.1", 25, "required"),
    "submission": ("smtp.office365.com", 587, "required"),
    "direct_send": ("", 25, "opportunistic"),
    "connector": ("", 25, "required"),
    "graph": ("", 443, "required"),
}


def _transport(t: _Table) -> TransportSettings:
    name = t.get("name", str, "")
    if not name:
        raise ConfigError(t.key("name"), name, "Every transport needs a name.")
    kind = t.choice("type", tuple(_TYPE_DEFAULTS), "smarthost")
    host, port, tls = _TYPE_DEFAULTS[kind]
    s = TransportSettings(
        name=name,
        type=kind,
        host=t.get("host", str, host),
        port=_port(t, "port", port),
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
        m365=_m365(t, kind) if kind != "smarthost" else M365Options(),
    )
    if s.password is not None and s.username is None:
        raise ConfigError(t.key("username"), None, "A password needs a username.")
    t.done()
    return s


def _m365(t: _Table, kind: str) -> M365Options:
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


def _route(t: _Table, transports: set[str]) -> RouteSettings:
    s = RouteSettings(
        name=t.get("name", str, t.key("")),
        transport=t.get("transport", str, ""),
        recipient_domains=tuple(d.lower().lstrip("@") for d in t.strings("recipient_domains")),
        senders=tuple(_sender_pattern(t.key("senders"), v) for v in t.strings("senders")),
        devices=t.strings("devices"),
        max_size=t.opt("max_size", int),
        fallbacks=t.strings("fallbacks"),
    )
    for key, name in [("transport", s.transport), *(("fallbacks", f) for f in s.fallbacks)]:
        if name not in transports:
            raise ConfigError(t.key(key), name, "No transport of that name.")
    t.done()
    return s


def parse_settings(data: Mapping[str, Any], *, base: Path, source: Path | None = None) -> Settings:
    root = _Table(data, "", base)
    server = _server(root.table("server"))
    listeners = tuple(_listener(t) for t in root.tables("listener"))
    devices = tuple(_device(t) for t in root.tables("device"))
    delivery = _delivery(root.table("delivery"))
    transports = tuple(_transport(t) for t in root.tables("transport"))
    names = {t.name for t in transports}
    routes = tuple(_route(t, names) for t in root.tables("route"))
    admin = _admin(root.table("admin"))
    tracking = _tracking(root.table("tracking"))
    spool = _spool(root.table("spool"), server)
    tracing = _tracing(root.table("tracing"), transports)
    root.done()
    _check_unique("listener", [(x.name, (x.address, x.port or x.name)) for x in listeners])
    _check_unique("device", [(d.name, d.username or d.name) for d in devices])
    _check_unique("transport", [(t.name, t.name) for t in transports])
    if transports and not routes:
        routes = (RouteSettings(name="default", transport=transports[0].name),)
    return Settings(
        server, listeners, devices, delivery, transports, routes, source, admin, tracking, spool, tracing
    )


def _check_unique(kind: str, items: list[tuple[str, object]]) -> None:
    seen_names: set[str] = set()
    seen_keys: set[object] = set()
    for i, (name, key) in enumerate(items):
        if name in seen_names or key in seen_keys:
            raise ConfigError(f"{kind}[{i}]", name, f"Duplicate {kind} (name, address or username).")
        seen_names.add(name)
        seen_keys.add(key)


def load_settings(path: Path) -> Settings:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError("config file", str(path), f"Cannot read it: {e.strerror}.") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("config file", str(path), f"Not valid TOML: {e}.") from None
    return parse_settings(data, base=path.resolve().parent, source=path)
