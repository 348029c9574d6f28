"""The README's run command: ``relay365 serve`` with no relay365.toml runs the relay in front of the
built-in sandbox; swaks, as the README shows it (default sender root@<host>), gets mail into both a
Direct Send mailbox and an external recipient, and the printed ``sandbox mail list`` command shows it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import httpx

from tests.core.helpers import free_port


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
