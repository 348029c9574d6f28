"""Write relay365.toml files for doctor --config tests (a minimal TOML writer: tables, arrays of
tables, strings, numbers, booleans and lists of those), and build transports into a running sandbox."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from relay365.sandbox.runner import Sandbox

APP_ID = "11111111-2222-3333-4444-555555555555"
APP_SECRET = "sandbox-secret-relay365"
SECRET_ENV = "RELAY365_DIAG_APP_SECRET"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def _pairs(table: dict[str, Any]) -> list[str]:
    return [f"{k} = {_value(v)}" for k, v in table.items()]


def to_toml(data: dict[str, Any]) -> str:
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines += [f"[{key}]", *_pairs(value), ""]
        elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            for item in value:
                lines += [f"[[{key}]]", *_pairs(item), ""]
        else:
            lines.insert(0, f"{key} = {_value(value)}")
    return "\n".join(lines) + "\n"


def write_config(tmp_path: Path, **sections: Any) -> Path:
    """A relay365.toml under tmp_path: spool in tmp_path/spool, one plain loopback listener, a LAN
    device; ``sections`` replace or extend those."""
    data: dict[str, Any] = {
        "server": {"hostname": "relay.test", "spool_dir": str(tmp_path / "spool")},
        "listener": [{"name": "lan", "address": "127.0.0.1", "port": 0, "tls": "none", "auth": False}],
        "device": [{"name": "lan", "ip_allow": ["127.0.0.0/8"]}],
        "delivery": {"min_backoff": 60, "max_backoff": 600, "poll_interval": 0.2},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = tmp_path / "relay365.toml"
    path.write_text(to_toml(data), encoding="utf-8")
    return path


def oauth(sb: Sandbox, *, client_id: str = APP_ID) -> dict[str, Any]:
    return {
        "tenant": sb.ctx.tenant.tenant_id,
        "client_id": client_id,
        "client_secret_env": SECRET_ENV,
        "authority": sb.base_url,
        "authority_ca_file": str(sb.ca_path),
    }


def submission(sb: Sandbox, mailbox: str = "scanner@contoso.test") -> dict[str, Any]:
    return {
        "name": "submission",
        "type": "submission",
        "host": "127.0.0.1",
        "port": sb.submission_port,
        "ca_file": str(sb.ca_path),
        "mailbox": mailbox,
        **oauth(sb),
    }


def graph(sb: Sandbox, mailbox: str = "scanner@contoso.test", *, client_id: str = APP_ID) -> dict[str, Any]:
    return {
        "name": "graph",
        "type": "graph",
        "mailbox": mailbox,
        "graph_url": sb.graph_url,
        "ca_file": str(sb.ca_path),
        **oauth(sb, client_id=client_id),
    }


def direct_send(sb: Sandbox, port: int | None = None) -> dict[str, Any]:
    return {
        "name": "direct",
        "type": "direct_send",
        "host": "127.0.0.1",
        "port": sb.mx_port if port is None else port,
        "ca_file": str(sb.ca_path),
        "accepted_domains": ["contoso.test", "fabrikam.test"],
    }
