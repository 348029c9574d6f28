"""relay365.toml, parsed once at the edge into frozen, typed settings.

Every error names the key and the bad value (``ConfigError``). Secrets never need to sit in the file:
device passwords are Argon2id hashes, upstream secrets come from ``*_env`` (an environment variable)
or ``*_file`` (a file readable only by the service user, mode 0600).

::

    model.py       the dataclasses (Settings and one per table) and the limits they default to
    table.py       Table: typed getters naming the full key in every error; shared value checks
    sections.py    [server], [[listener]], [[device]], [delivery], [spool], [admin], [tracking],
                   [tracing]; redact_url / check_postgres_url
    transports.py  [[transport]] (defaults per type, Microsoft 365's options) and [[route]]
    load.py        load_settings / parse_settings: the whole file, unknown keys, duplicate names

Everything is imported from ``relay365.settings`` itself.
"""

from relay365.settings.load import load_settings, parse_settings
from relay365.settings.model import (
    DEFAULT_MAX_HEADER_SIZE,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_RECIPIENTS,
    LISTENER_TLS_MODES,
    NULL_SENDER,
    TLS_VERSIONS,
    UPSTREAM_TLS_MODES,
    AdminSettings,
    DeliverySettings,
    DeviceSettings,
    ListenerSettings,
    M365Options,
    Network,
    RouteSettings,
    SecretRef,
    ServerSettings,
    Settings,
    SpoolSettings,
    TlsMode,
    TlsVersion,
    TracingSettings,
    TrackingSettings,
    TransportSettings,
    UpstreamTls,
)
from relay365.settings.sections import SPOOL_SCHEMES, TRACE_MAX_HORIZON, check_postgres_url, redact_url
from relay365.settings.transports import TYPE_DEFAULTS

_TYPE_DEFAULTS = TYPE_DEFAULTS  # (its name before the split into a package)

__all__ = [
    "DEFAULT_MAX_HEADER_SIZE",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_RECIPIENTS",
    "LISTENER_TLS_MODES",
    "NULL_SENDER",
    "SPOOL_SCHEMES",
    "TLS_VERSIONS",
    "TRACE_MAX_HORIZON",
    "TYPE_DEFAULTS",
    "UPSTREAM_TLS_MODES",
    "AdminSettings",
    "DeliverySettings",
    "DeviceSettings",
    "ListenerSettings",
    "M365Options",
    "Network",
    "RouteSettings",
    "SecretRef",
    "ServerSettings",
    "Settings",
    "SpoolSettings",
    "TlsMode",
    "TlsVersion",
    "TracingSettings",
    "TrackingSettings",
    "TransportSettings",
    "UpstreamTls",
    "check_postgres_url",
    "load_settings",
    "parse_settings",
    "redact_url",
]
