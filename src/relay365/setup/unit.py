"""The systemd unit relay365 runs under, its service user, and what its sandbox lets the relay reach.

The service runs as its own static system user ``relay365`` (a sysusers.d entry), not ``DynamicUser=``:
the admin tools must act on the service's files as the service does (``sudo -u relay365 relay365 login
NAME`` writes the token cache the service refreshes; ``queue`` commands open its spool), secret and key
files are handed over the usual way (``chown relay365``, mode 0600, which ``load_secret`` demands), and a
reload can re-read them, which ``LoadCredential=`` copies would not allow. The sandbox (systemd.exec(5))
leaves it write access to its StateDirectory only and the one capability it needs: binding ports below
1024 (25, 465, 587).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from relay365 import __version__
from relay365.settings import Settings

SERVICE = "relay365"
CONFIG_DIR = Path("/etc/relay365")
STATE_DIR = Path("/var/lib/relay365")
DEFAULT_CONFIG = CONFIG_DIR / "relay365.toml"
DEFAULT_SPOOL = STATE_DIR / "spool"
ENV_FILE = CONFIG_DIR / "env"  # NAME=value lines for *_env secrets; root-only (0600), read by systemd
UNIT_FILE = Path("/etc/systemd/system") / f"{SERVICE}.service"
SYSUSERS_FILE = Path("/etc/sysusers.d") / f"{SERVICE}.conf"
# What ProtectHome=yes hides and PrivateTmp=yes replaces: nothing the service needs may live there.
HIDDEN = (Path("/home"), Path("/root"), Path("/run/user"), Path("/tmp"), Path("/var/tmp"))  # noqa: S108
WATCHDOG_SEC = 30


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitOptions:
    exec_start: tuple[str, ...]  # the relay365 command (without "serve")
    config: Path = DEFAULT_CONFIG
    user: str = SERVICE


def default_exec() -> tuple[str, ...]:
    """How systemd should start this very installation: its ``relay365`` script next to the
    interpreter (a venv, a pipx venv), else the interpreter with ``-m relay365``."""
    script = Path(sys.executable).parent / "relay365"
    if script.is_file():
        return (str(script),)
    return (sys.executable, "-m", "relay365")


def hidden_by_sandbox(path: Path) -> Path | None:
    """The directory that hides ``path`` from the service (ProtectHome=, PrivateTmp=), if any."""
    resolved = path.resolve()
    for candidate in (path.absolute(), resolved):
        for prefix in HIDDEN:
            if candidate.is_relative_to(prefix):
                return prefix
    return None


def _exec_arg(arg: str) -> str:
    """One ExecStart= word: specifiers (%) and variables ($) kept literal, quoted if needed
    (systemd.service(5), "Command lines")."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not any(c.isspace() or c in "\"'\\;" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_line(o: UnitOptions) -> str:
    return " ".join(_exec_arg(a) for a in (*o.exec_start, "serve", "--config", str(o.config)))


def render_unit(o: UnitOptions) -> str:
    """The unit file. Each sandboxing line says what it protects (README: "Install as a service")."""
    return f"""\
# {SERVICE}.service, written by `relay365 service install` (relay365 {__version__}).
# Change settings with `systemctl edit {SERVICE}` (a drop-in): a new install rewrites this file.
[Unit]
Description=relay365 SMTP relay to Microsoft 365
After=network-online.target
Wants=network-online.target

[Service]
# READY=1 once the spool is recovered and every listener accepts connections; then a watchdog ping
# every {WATCHDOG_SEC // 2}s from the event loop: a hung relay is killed and restarted.
Type=notify
NotifyAccess=main
WatchdogSec={WATCHDOG_SEC}s
ExecStart={exec_line(o)}
# systemctl reload: SIGHUP re-reads the config (devices, passwords, routes, transports, certificates)
# without dropping sessions or mail; RELOADING=1, then READY=1. A broken file is refused and logged.
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5s
# SIGTERM: stop accepting, finish the sessions and deliveries in flight (30s grace each).
TimeoutStopSec=90s
SyslogIdentifier={SERVICE}
# Secrets named by *_env keys: NAME=value lines in a root-only file (read by systemd, not the service).
EnvironmentFile=-{ENV_FILE}
# 1000 device connections by default, plus upstream connections and spool files.
LimitNOFILE=65536

# Its own unprivileged user; the only capability: binding ports below 1024 (25, 465, 587).
User={o.user}
Group={o.user}
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
NoNewPrivileges=yes
# {STATE_DIR} (spool, token caches, self-signed certificate) is the only writable place.
StateDirectory={SERVICE}
StateDirectoryMode=0700
ConfigurationDirectory={SERVICE}
WorkingDirectory={STATE_DIR}
UMask=0077
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
RemoveIPC=yes
# IPv4/IPv6 for SMTP, HTTPS and DNS; unix sockets for the journal and sd_notify.
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


def render_sysusers(user: str) -> str:
    """A sysusers.d(5) entry: a system user and group, home = the state directory, no login shell."""
    return (
        f"# {user}: the user relay365.service runs as (written by `relay365 service install`).\n"
        f'u {user} - "relay365 SMTP relay" {STATE_DIR} /usr/sbin/nologin\n'
    )


def sandbox_problems(settings: Settings) -> list[str]:
    """What in ``settings`` the service could not reach inside its sandbox, one sentence each."""
    problems: list[str] = []
    if not settings.server.spool_dir.is_relative_to(STATE_DIR):
        problems.append(
            f"server.spool_dir is {settings.server.spool_dir}: the service may only write under"
            f' {STATE_DIR} (StateDirectory, ProtectSystem=strict); set spool_dir = "{DEFAULT_SPOOL}"'
        )
    files: list[tuple[str, Path | None]] = []
    for i, x in enumerate(settings.listeners):
        files += [(f"listener[{i}].{k}", getattr(x, k)) for k in ("cert_file", "key_file", "client_ca_file")]
    for i, t in enumerate(settings.transports):
        key = f"transport[{i}]"
        files += [(f"{key}.ca_file", t.ca_file), (f"{key}.client_cert_file", t.client_cert_file)]
        files += [(f"{key}.client_key_file", t.client_key_file)]
        files += [(f"{key}.certificate_file", t.m365.certificate_file)]
        files += [(f"{key}.authority_ca_file", t.m365.authority_ca_file)]
        for ref in (t.password, t.m365.client_secret):
            if ref is not None and ref.file is not None:
                files.append((f"{ref.key}_file", ref.file))
        cache = t.m365.token_cache
        if cache is not None and not cache.is_relative_to(STATE_DIR):
            problems.append(
                f"{key}.token_cache is {cache}: the service rewrites it when the token is refreshed and"
                f" may only write under {STATE_DIR}; put it there"
            )
    for key, path in files:
        if path is not None and (prefix := hidden_by_sandbox(path)) is not None:
            problems.append(
                f"{key} is {path}: the service cannot see {prefix} (ProtectHome=, PrivateTmp=);"
                f" move it, e.g. to {CONFIG_DIR}/"
            )
    return problems
