"""``relay365 init``: a relay365.toml from a few answers (the advisor's option, the tenant, the mailbox,
the devices), valid as written and without a secret in it.

The answers are an :class:`InitPlan`; :func:`render_config` turns it into commented TOML, and
:func:`check_rendered` parses that with the relay's own settings parser, so what ``init`` writes is what
``relay365 config check`` accepts. Device passwords are stored as Argon2id hashes; the app's client
secret is only named (``client_secret_env`` or ``client_secret_file``) and :func:`secret_instructions`
tells where to put it.
"""

from __future__ import annotations

import ipaddress
import re
import textwrap
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

from relay365.diagnostics.advisor import Option
from relay365.errors import ConfigError
from relay365.settings import Settings, parse_settings
from relay365.setup.unit import CONFIG_DIR, DEFAULT_SPOOL, ENV_FILE, SERVICE

DEFAULT_SECRET_ENV = "RELAY365_CLIENT_SECRET"
OAUTH_OPTIONS = (Option.SUBMISSION, Option.GRAPH)
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,62}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceLogin:
    name: str
    password_hash: str  # Argon2id (relay365.credentials.hash_password)


@dataclass(frozen=True, slots=True, kw_only=True)
class InitPlan:
    option: Option
    domains: tuple[str, ...]  # the tenant's accepted domains; the first is the main one
    hostname: str
    spool_dir: str
    tenant: str | None = None  # submission, graph: directory (tenant) id or domain
    client_id: str | None = None
    mailbox: str | None = None
    secret_env: str | None = None
    secret_file: str | None = None
    ip_allow: tuple[str, ...] = ()
    logins: tuple[DeviceLogin, ...] = ()
    port: int = 587
    tls: str = "starttls"
    legacy_tls: bool = False
    internal_only: bool = False  # only the accepted domains are routed (Direct Send always)
    sent_items: bool = True  # graph: keep a copy in Sent Items


def default_spool(output: Path) -> str:
    """Under the service's state directory when the config goes to /etc/relay365, else beside it."""
    return str(DEFAULT_SPOOL) if output.absolute().parent == CONFIG_DIR else "var/spool"


def validate(plan: InitPlan) -> None:
    """Each bad answer as a ConfigError naming the ``init`` option it came from."""
    if not plan.domains:
        raise ConfigError("--domain", None, "Name at least one accepted domain of the tenant.")
    for d in plan.domains:
        if not _DOMAIN.match(d):
            raise ConfigError("--domain", d, "Not a domain name.")
    for net in plan.ip_allow:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError("--device-ip", net, "Not an IP address or CIDR network.") from None
    names = [x.name for x in plan.logins]
    for name in names:
        if not _NAME.match(name):
            raise ConfigError("--device-login", name, "Use letters, digits and . _ @ - (at most 64).")
    if len(set(names)) != len(names) or "by-address" in names:
        raise ConfigError("--device-login", names, "Device names must be unique (and not 'by-address').")
    if not plan.ip_allow and not plan.logins:
        raise ConfigError(
            "--device-ip/--device-login", None, "No device could send: allow an address or add a login."
        )
    if not 1 <= plan.port <= 65535:
        raise ConfigError("--port", plan.port, "Not a TCP port (1-65535).")
    if plan.option in OAUTH_OPTIONS:
        if not plan.mailbox or "@" not in plan.mailbox:
            raise ConfigError("--mailbox", plan.mailbox, f"{plan.option.value} sends as a mailbox; name it.")
        if not plan.tenant:
            raise ConfigError("--tenant", plan.tenant, "Give the directory (tenant) id or a domain.")
        try:
            uuid.UUID(plan.client_id or "")
        except ValueError:
            raise ConfigError(
                "--client-id", plan.client_id, "Not an application (client) id (a GUID, from Entra)."
            ) from None
        if (plan.secret_env is None) == (plan.secret_file is None):
            raise ConfigError("--client-secret-env", plan.secret_env, "Give a variable or a file, one.")
        if plan.secret_env is not None and not _ENV.match(plan.secret_env):
            raise ConfigError("--client-secret-env", plan.secret_env, "Not an environment variable name.")


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(_q(v) for v in values) + "]"


def secret_instructions(plan: InitPlan) -> list[str]:
    """Where each secret goes; none of them is in the file."""
    out = []
    if plan.option in OAUTH_OPTIONS:
        if plan.secret_env is not None:
            out.append(
                f"The app's client secret goes into the environment variable {plan.secret_env}: as a"
                f" service, a line {plan.secret_env}=... in {ENV_FILE} (chmod 600; systemd reads it);"
                f" in a shell, export {plan.secret_env}=..."
            )
        else:
            out.append(
                f"The app's client secret goes into {plan.secret_file}: the secret alone, chmod 600,"
                f" owned by the user relay365 runs as (as a service: chown {SERVICE})."
            )
    if plan.logins:
        names = ", ".join(x.name for x in plan.logins)
        out.append(
            f"Device passwords ({names}) are stored as Argon2id hashes only; type the passwords into the"
            " devices. A new one: relay365 device passwd NAME"
        )
    return out


def _listener(plan: InitPlan) -> list[str]:
    lines = [
        "# Where devices connect. Without cert_file/key_file relay365 makes a self-signed certificate.",
        "[[listener]]",
        'name = "devices"',
        'address = "0.0.0.0"',
        f"port = {plan.port}",
        f"tls = {_q(plan.tls)}",
    ]
    if plan.legacy_tls:
        lines += [
            'min_tls_version = "1.0"       # old devices without TLS 1.2, on the LAN only',
            "legacy = true",
        ]
    lines += [
        '# cert_file = "/etc/relay365/tls/relay.crt"',
        '# key_file = "/etc/relay365/tls/relay.key"',
    ]
    return lines


def _devices(plan: InitPlan) -> list[str]:
    policy: list[str] = []
    if plan.option in OAUTH_OPTIONS:
        assert plan.mailbox is not None
        policy.append(
            f"rewrite_sender = {_q(plan.mailbox)}   # sent as the mailbox; the device's From goes to Reply-To"
        )
    else:
        policy.append(f"allowed_senders = {_list(tuple('@' + d for d in plan.domains))}")
    lines: list[str] = []
    if plan.ip_allow:
        lines += ["", "# Devices known by their address: they send without a password.", "[[device]]"]
        lines += ['name = "by-address"', f"ip_allow = {_list(plan.ip_allow)}", *policy]
    for login in plan.logins:
        lines += ["", f"# SMTP AUTH user {login.name}; a new password: relay365 device passwd {login.name}"]
        lines += ["[[device]]", f"name = {_q(login.name)}", f"password_hash = {_q(login.password_hash)}"]
        lines += policy
    return lines


def _transport(plan: InitPlan) -> list[str]:
    o = plan.option
    lines = ["", "# How relay365 delivers to Microsoft 365.", "[[transport]]", f"name = {_q(o.value)}"]
    lines.append(f"type = {_q(o.value)}")
    if o in OAUTH_OPTIONS:
        assert plan.mailbox and plan.tenant and plan.client_id
        lines += [
            f"mailbox = {_q(plan.mailbox)}",
            f"tenant = {_q(plan.tenant)}",
            f"client_id = {_q(plan.client_id)}",
        ]
        if plan.secret_env is not None:
            lines.append(f"client_secret_env = {_q(plan.secret_env)}   # the secret itself: see the top")
        else:
            assert plan.secret_file is not None
            lines.append(f"client_secret_file = {_q(plan.secret_file)}   # the secret itself, chmod 600")
        if o is Option.GRAPH:
            lines.append(f"save_to_sent_items = {'true' if plan.sent_items else 'false'}")
    else:
        lines += [
            "# host: the MX record of the first domain (or set the MX value from the admin center)",
            f"accepted_domains = {_list(plan.domains)}",
        ]
    return lines


def render_config(plan: InitPlan) -> str:
    validate(plan)
    head = [
        "# relay365.toml written by `relay365 init`. Check it: relay365 config check THIS-FILE",
        "# Every key: relay365 config example. No secret is in this file:",
        *(
            wrapped
            for line in secret_instructions(plan)
            for wrapped in textwrap.wrap(line, 100, initial_indent="# - ", subsequent_indent="#   ")
        ),
        "",
        "[server]",
        f"hostname = {_q(plan.hostname)}   # in the banner, EHLO and Received: fields",
        f"spool_dir = {_q(plan.spool_dir)}",
        "",
    ]
    route = [
        "",
        "[[route]]",
        f"name = {_q('to-' + plan.option.value)}",
        f"transport = {_q(plan.option.value)}",
    ]
    if plan.internal_only or plan.option is Option.DIRECT_SEND:
        route.append(f"recipient_domains = {_list(plan.domains)}   # others are bounced at once")
    lines = [*head, *_listener(plan), *_devices(plan), *_transport(plan), *route]
    return "\n".join(lines) + "\n"


def check_rendered(text: str, output: Path) -> Settings:
    """Parse what ``init`` is about to write exactly as ``relay365 config check`` will."""
    return parse_settings(tomllib.loads(text), base=output.absolute().parent, source=output)
