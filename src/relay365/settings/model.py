"""The settings model: frozen, typed dataclasses, one per table of relay365.toml, and the limits they
default to. Nothing here reads a file (``load.py`` does, through ``sections.py`` and ``transports.py``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from relay365.logformats import LogFormat

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
