"""Issue 11's memory goal: ``relay365 serve`` imports only what its config uses. A plain relay (one
listener, a smarthost) runs as a real process and takes a real SMTP session; at its exit it writes the
modules it imported, which must include none of the console, OAuth/Graph, the trace follower,
PostgreSQL, cryptography or the tools (each loaded only by a config or command that needs it)."""

from __future__ import annotations

import json
import re
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from tests.support.helpers import free_port

# Run as ``relay365`` runs (cli.main), writing sys.modules at exit (SIGTERM ends serve with SystemExit).
DUMP = (
    "import atexit, json, sys\n"
    "out = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(out, 'w').write(json.dumps(sorted(sys.modules))))\n"
    "from relay365.cli import main\n"
    "main()\n"
)
HEAVY = (
    "starlette", "uvicorn", "jinja2", "relay365.admin.service", "relay365.admin.server",  # the console
    "msal", "httpx", "relay365.oauth", "relay365.transports.graph", "relay365.transports.submission",
    "relay365.tracing.follower", "relay365.tracing.graph_trace",  # the trace follower
    "psycopg", "relay365.spool.postgres", "relay365.observability.tracking_pg",  # PostgreSQL
    "cryptography", "trustme",  # certificates: none configured, none to make (tls = "none")
    "relay365.sandbox", "relay365.diagnostics", "relay365.setup", "relay365.console_cli",  # the tools
    "relay365.spool_cli",
)  # fmt: skip


def _modules(tmp_path: Path, *args: str, session: bool) -> list[str]:
    out = tmp_path / "modules.json"
    with subprocess.Popen(
        [sys.executable, "-c", DUMP, str(out), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        seen = ""
        try:
            if session:
                deadline = time.monotonic() + 120
                while (m := re.search(r"listening: lan on 127\.0\.0\.1:(\d+)", seen)) is None:
                    line = proc.stdout.readline()
                    assert line and time.monotonic() < deadline, f"serve did not start:\n{seen}"
                    seen += line
                with smtplib.SMTP("127.0.0.1", int(m.group(1)), timeout=30) as smtp:
                    code, _ = smtp.ehlo("printer.example")
                    assert code == 250
                proc.send_signal(signal.SIGTERM)
            seen += proc.stdout.read()
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, seen
    modules: list[str] = json.loads(out.read_text())
    return modules


def _heavy(modules: list[str]) -> list[str]:
    return sorted({h for h in HEAVY for m in modules if m == h or m.startswith(h + ".")})


def test_a_plain_serve_imports_only_what_its_config_uses(tmp_path: Path) -> None:
    config = tmp_path / "relay365.toml"
    config.write_text(
        f"""[server]
hostname = "relay.example"
spool_dir = "{tmp_path / "spool"}"

[[listener]]
name = "lan"
address = "127.0.0.1"
port = 0
tls = "none"

[[device]]
name = "printer"
ip_allow = ["127.0.0.0/8"]

[[transport]]
name = "sink"
type = "smarthost"
host = "127.0.0.1"
port = {free_port()}
tls = "none"
"""
    )
    modules = _modules(tmp_path, "serve", "-c", str(config), session=True)
    assert "relay365.ingress.server" in modules and "relay365.transports.smarthost" in modules  # it ran
    assert _heavy(modules) == []


def test_version_imports_no_command_module(tmp_path: Path) -> None:
    modules = _modules(tmp_path, "--version", session=False)
    assert "relay365.cli" in modules
    assert _heavy(modules) == []
    assert "relay365.service.run" not in modules
