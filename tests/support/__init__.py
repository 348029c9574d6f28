"""The tests' shared helpers, one place to import them from: ``from tests.support import ...``.

- relay.py: ``make_settings`` (relay settings from TOML-shaped dicts), ``running_relay``,
  ``RecordingUpstream`` (an aiosmtpd upstream that records what it gets; the ``upstream`` fixture),
  ``smarthost``.
- helpers.py: ``Clock`` (a clock the test moves), ports, bounded waits (``wait_until``, ``wait_state``),
  configs for subprocesses (``write_config``), ``run_cli``, ``ServeProcess`` (``relay365 serve``),
  Postfix's ``smtp-sink``, ``send_message``.
- smtpraw.py: ``RawSMTP``, exact bytes on the wire.
- m365.py: the settings that route into a running sandbox tenant (and, imported from there, ``send``
  and ``wait_until`` for those tests).
- delivery.py: the delivery tests' relay settings, ``send``, ``settle`` and ``parse_dsn`` (imported
  from there).
- pgcluster.py: a private PostgreSQL cluster per session (per xdist worker), a database per test.
"""

from tests.support.helpers import (
    RELAY365,
    T0,
    Clock,
    ServeProcess,
    SmtpSink,
    body_files,
    body_of,
    closed_port,
    config_data,
    free_port,
    issue_pair,
    run_cli,
    send_message,
    serving,
    smarthost_cfg,
    smtp_sink,
    spool_files,
    toml_dumps,
    trusting,
    wait_for,
    wait_gone,
    wait_state,
    wait_until,
    write_config,
)
from tests.support.m365 import (
    APP_ID,
    APP_SECRET,
    SECRET_ENV,
    connector,
    direct_send,
    oauth,
    submission,
)
from tests.support.pgcluster import (
    TEMPLATE,
    PgDatabase,
    PostgresCluster,
    server_bindir,
)
from tests.support.relay import (
    Received,
    RecordingUpstream,
    UpstreamPlan,
    make_settings,
    merge_sections,
    running_relay,
    smarthost,
)
from tests.support.smtpraw import (
    RawSMTP,
    client_context,
)

__all__ = [
    "APP_ID",
    "APP_SECRET",
    "RELAY365",
    "SECRET_ENV",
    "T0",
    "TEMPLATE",
    "Clock",
    "PgDatabase",
    "PostgresCluster",
    "RawSMTP",
    "Received",
    "RecordingUpstream",
    "ServeProcess",
    "SmtpSink",
    "UpstreamPlan",
    "body_files",
    "body_of",
    "client_context",
    "closed_port",
    "config_data",
    "connector",
    "direct_send",
    "free_port",
    "issue_pair",
    "make_settings",
    "merge_sections",
    "oauth",
    "run_cli",
    "running_relay",
    "send_message",
    "server_bindir",
    "serving",
    "smarthost",
    "smarthost_cfg",
    "smtp_sink",
    "spool_files",
    "submission",
    "toml_dumps",
    "trusting",
    "wait_for",
    "wait_gone",
    "wait_state",
    "wait_until",
    "write_config",
]
