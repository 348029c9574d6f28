"""The README's run command: ``relay365 serve`` with no relay365.toml runs the relay in front of the
built-in sandbox; swaks, as the README shows it (default sender root@<host>), gets mail into both a
Direct Send mailbox and an external recipient, and the printed ``sandbox mail list`` command shows it."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest

from tests.support import free_port


@pytest.mark.slow
def test_demo_without_config_delivers_what_swaks_sends(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay365", "serve", "--demo-dir", "state", "--demo-port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    output = ""
    try:
        deadline = time.monotonic() + 60
        while "Console:" not in output:
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, f"demo did not start:\n{output}"
            output += line
        assert "No relay365.toml here: starting the demo" in output
        assert f"swaks --server 127.0.0.1:{port} --to alice@contoso.test" in output
        [command] = re.findall(r"Then:\s+(\S+) sandbox mail list --state-dir (\S+)", output)
        script, state_dir = command
        assert Path(script).name == "relay365" and Path(state_dir) == tmp_path / "state" / "sandbox"

        for rcpt in ("alice@contoso.test", "partner@example.org"):
            swaks = subprocess.run(
                ["swaks", "--server", f"127.0.0.1:{port}", "--to", rcpt],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert swaks.returncode == 0 and "250 2.0.0 Ok: queued as" in swaks.stdout, swaks.stdout

        deadline = time.monotonic() + 30
        while True:
            listed = subprocess.run(
                [script, "sandbox", "mail", "list", "--state-dir", state_dir, "--json"],
                capture_output=True, text=True, timeout=60, check=True,
            )  # fmt: skip
            where = sorted((m["folder"], m["mailbox"], m["endpoint"]) for m in json.loads(listed.stdout))
            if len(where) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert where == [
            ("Inbox", "alice@contoso.test", "mx"),  # Direct Send
            ("Internet", "partner@example.org", "submission"),  # SMTP AUTH with XOAUTH2
            ("SentItems", "scanner@contoso.test", "submission"),
        ]
        # The console on loopback with the one-time password printed in one line.
        [(url, password)] = re.findall(
            r"^Console: (http://127\.0\.0\.1:\d+/) \(user admin, password (\S+)\)$", output, re.M
        )
        with httpx.Client(base_url=url, trust_env=False, timeout=30) as http:
            assert http.post("/login", data={"username": "admin", "password": "wrong"}).status_code == 401
            assert http.post("/login", data={"username": "admin", "password": password}).status_code == 303
            trace = http.get("/api/trace", params={"recipient": "alice@contoso.test"}).json()["events"]
            assert "delivered" in [e["kind"] for e in trace]
            boxes = http.get("/api/mailboxes", params={"mailbox": "alice@contoso.test"}).json()
            assert [m["folder"] for m in boxes["messages"]] == ["Inbox"]
            page = http.get("/mailboxes/" + urllib.parse.quote(boxes["messages"][0]["id"]))
            assert page.status_code == 200 and "alice@contoso.test" in page.text
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output + rest


def test_demo_ports_can_be_pinned(tmp_path: Path) -> None:
    """Issue 13 item 11: ``serve --port`` and the sandbox's ports, so a demo runs beside other services."""
    port, submission, mx, http = (free_port() for _ in range(4))
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable, "-m", "relay365", "serve", "--demo-dir", "state", "--port", str(port),
        "--sandbox-submission-port", str(submission), "--sandbox-mx-port", str(mx),
        "--sandbox-http-port", str(http),
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    output = ""
    try:
        deadline = time.monotonic() + 60
        while "Sandbox:" not in output:
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, f"demo did not start:\n{output}"
            output += line
        assert f"swaks --server 127.0.0.1:{port} " in output
        assert (
            f"SMTP AUTH 127.0.0.1:{submission}, MX 127.0.0.1:{mx}, HTTPS (token, Graph) https://127.0.0.1:{http}"
            in output
        )
        for smtp_port in (port, submission, mx):
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
                assert client.noop()[0] == 250
        with socket.create_connection(("127.0.0.1", http), timeout=10):
            pass
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output + rest


def test_pinned_ports_in_use_and_with_a_config(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "relay365", "serve", "--demo-dir", "state", "--port", str(free_port()),
             "--sandbox-http-port", str(taken)],
            cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{taken}" in result.stderr
    (tmp_path / "relay365.toml").write_text('[[listener]]\nname = "lan"\nport = 0\n')
    with_config = subprocess.run(
        [sys.executable, "-m", "relay365", "serve", "--port", "2600"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert with_config.returncode == 2 and "are for the demo" in with_config.stderr
