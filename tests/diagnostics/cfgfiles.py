"""Write relay365.toml files for doctor --config tests, and build transports into a running sandbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relay365.sandbox.runner import Sandbox
from tests.support import APP_ID, APP_SECRET, SECRET_ENV, merge_sections, oauth, toml_dumps
from tests.support import submission as m365_submission

__all__ = ["APP_ID", "APP_SECRET", "SECRET_ENV", "direct_send", "graph", "submission", "write_config"]


def write_config(tmp_path: Path, **sections: Any) -> Path:
    """A relay365.toml under tmp_path: spool in tmp_path/spool, one plain loopback listener, a LAN
    device; ``sections`` replace or extend those."""
    data: dict[str, Any] = {
        "server": {"hostname": "relay.test", "spool_dir": str(tmp_path / "spool")},
        "listener": [{"name": "lan", "address": "127.0.0.1", "port": 0, "tls": "none", "auth": False}],
        "device": [{"name": "lan", "ip_allow": ["127.0.0.0/8"]}],
        "delivery": {"min_backoff": 60, "max_backoff": 600, "poll_interval": 0.2},
    }
    path = tmp_path / "relay365.toml"
    path.write_text(toml_dumps(merge_sections(data, sections)), encoding="utf-8")
    return path


def submission(sb: Sandbox, mailbox: str = "scanner@contoso.test") -> dict[str, Any]:
    return m365_submission(sb, mailbox=mailbox)


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
