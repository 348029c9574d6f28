"""``relay365 sandbox``: the running process (example tenant, all endpoints) and the mail/rejection views."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import ssl
import sys
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import httpx
import pytest
from typer.testing import CliRunner

from relay365.sandbox.cli import app
from relay365.sandbox.runner import Sandbox
from tests.sandbox.sandbox_helpers import ALICE, SCANNER, make_tenant, message, xoauth2
from tests.support import free_port

pytestmark = pytest.mark.timeout(90)

EXAMPLE_APP = "11111111-2222-3333-4444-555555555555"
EXAMPLE_SECRET = "sandbox-secret-relay365"


async def test_mail_list_show_and_rejections(tmp_path: Path) -> None:
    async with Sandbox(make_tenant(), state_dir=tmp_path, serve_http=False) as sandbox:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sandbox.mx_port, start_tls=False, timeout=10)
        await client.connect()
        await client.sendmail(SCANNER, [ALICE], message(SCANNER, ALICE, "Toner low").as_bytes())
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await client.sendmail(SCANNER, ["ghost@contoso.test"], message(SCANNER, ALICE).as_bytes())
        await client.quit()
    runner = CliRunner()
    listed = runner.invoke(app, ["mail", "list", "--state-dir", str(tmp_path), "--json"])
    assert listed.exit_code == 0, listed.output
    (entry,) = json.loads(listed.output)
    assert (entry["mailbox"], entry["folder"], entry["endpoint"], entry["subject"]) == (
        ALICE,
        "Inbox",
        "mx",
        "Toner low",
    )
    table = runner.invoke(app, ["mail", "list", "--state-dir", str(tmp_path), "--mailbox", ALICE])
    assert table.exit_code == 0 and "Toner low" in table.output and "1 message(s)" in table.output
    shown = runner.invoke(app, ["mail", "show", entry["id"], "--state-dir", str(tmp_path)])
    assert shown.exit_code == 0
    assert f"MAIL FROM:        {SCANNER}" in shown.output
    assert "Subject: Toner low" in shown.output
    missing = runner.invoke(app, ["mail", "show", "nope", "--state-dir", str(tmp_path)])
    assert missing.exit_code == 1
    counters = runner.invoke(app, ["rejections", "--state-dir", str(tmp_path), "--json"])
    assert json.loads(counters.output) == {"mx 550 5.4.1": 1}


async def _read_until(stream: asyncio.StreamReader, marker: str, timeout: float = 30) -> str:
    text = ""
    async with asyncio.timeout(timeout):
        while marker not in text:
            line = await stream.readline()
            if not line:
                raise AssertionError(f"process ended before {marker!r}:\n{text}")
            text += line.decode("utf-8", "replace")
    return text


async def _stop(proc: asyncio.subprocess.Process, sig: signal.Signals) -> tuple[int, str]:
    """Send ``sig``; the exit code and the rest of the output. A process still running after 20 s is
    killed (no sandbox left behind by a failing test) and the test fails with what it printed."""
    assert proc.stdout is not None
    proc.send_signal(sig)
    try:
        async with asyncio.timeout(20):
            rest = (await proc.stdout.read()).decode()
            return await proc.wait(), rest
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"still running 20 s after {sig.name}") from None


async def test_sandbox_command_runs_the_example_tenant_end_to_end(tmp_path: Path) -> None:
    """``python -m relay365.sandbox.cli``: settings printed, a real token from the HTTPS token
    endpoint used for XOAUTH2 on the submission port, Direct Send on the MX port, then Ctrl-C."""
    state = tmp_path / "state"
    pinned = [free_port() for _ in range(3)]  # issue 13 item 11: the ports can be pinned
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay365.sandbox.cli", "--state-dir", str(state),
        "--submission-port", str(pinned[0]), "--mx-port", str(pinned[1]), "--http-port", str(pinned[2]),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "160", "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        banner = await _read_until(proc.stdout, "Press Ctrl-C to stop.")
        for title in (
            "Option 1: SMTP AUTH client submission",
            "Option 2: Direct Send",
            "Option 3: SMTP relay",
        ):
            assert title in banner
        ports = [int(p) for p in re.findall(r"Port\s*\W\s*(\d+)", banner)]
        submission_port, mx_port, _, http_port = ports
        assert [submission_port, mx_port, http_port] == pinned
        ca = state / "tls" / "ca.pem"
        authority = f"https://127.0.0.1:{http_port}/8f1c2d3e-4b5a-4c6d-9e7f-0a1b2c3d4e5f"
        tls = ssl.create_default_context(cafile=str(ca))
        async with httpx.AsyncClient(verify=tls, timeout=10) as http:
            response = await http.post(
                f"{authority}/oauth2/v2.0/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": EXAMPLE_APP,
                    "client_secret": EXAMPLE_SECRET,
                    "scope": "https://outlook.office365.com/.default",
                },
            )
        assert response.status_code == 200, response.text
        token = response.json()["access_token"]
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=submission_port, start_tls=False, timeout=10)
        await client.connect()
        await client.starttls(tls_context=tls)
        await client.ehlo(hostname="mfp.contoso.test")
        auth = await client.execute_command(b"AUTH", b"XOAUTH2", xoauth2(SCANNER, token).encode())
        assert auth.code == 235, auth
        await client.sendmail(SCANNER, [ALICE], message(SCANNER, ALICE, "via submission").as_bytes())
        await client.quit()
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=mx_port, start_tls=False, timeout=10)
        await client.connect()
        await client.sendmail(SCANNER, [ALICE], message(SCANNER, ALICE, "via direct send").as_bytes())
        await client.quit()
    finally:
        code, rest = await _stop(proc, signal.SIGINT)
    assert code == 0, rest
    assert "Stopped." in rest
    listed = CliRunner().invoke(app, ["mail", "list", "--state-dir", str(state), "--json"])
    subjects = sorted((m["folder"], m["subject"]) for m in json.loads(listed.output))
    assert subjects == [
        ("Inbox", "via direct send"),
        ("Inbox", "via submission"),
        ("SentItems", "via submission"),
    ]


def _as_a_background_job() -> None:
    """What a shell does to a command started with ``&`` (no job control): SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(
    ("sig", "started"),
    [(signal.SIGINT, None), (signal.SIGINT, _as_a_background_job), (signal.SIGTERM, None)],
    ids=["ctrl-c", "ctrl-c-background-job", "sigterm"],
)
async def test_the_sandbox_stops_whole_on_sigint_and_sigterm(
    tmp_path: Path, sig: signal.Signals, started: Callable[[], None] | None
) -> None:
    """Every endpoint stops and the process ends with 0. uvicorn, left to itself, takes SIGINT and
    SIGTERM for its HTTPS endpoint alone: it stopped that endpoint, raised the signal again and, when
    SIGINT was ignored (a job started in the background), the process went on without it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay365.sandbox.cli", "--state-dir", str(tmp_path / "state"),
        "--submission-port", "0", "--mx-port", "0", "--http-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "160", "PYTHONUNBUFFERED": "1"}, preexec_fn=started,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        banner = await _read_until(proc.stdout, "Press Ctrl-C to stop.")
        submission_port, mx_port, _, http_port = (int(p) for p in re.findall(r"Port\s*\W\s*(\d+)", banner))
        for port in (submission_port, mx_port, http_port):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
    finally:
        code, rest = await _stop(proc, sig)
    assert code == 0, rest
    assert rest.strip().endswith("Stopped."), rest
    for port in (submission_port, mx_port, http_port):
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)


def test_a_bad_tenant_file_names_the_key_and_value(tmp_path: Path) -> None:
    path = tmp_path / "tenant.toml"
    path.write_text('tenant_id = "t"\nname = "n"\naccepted_domains = []\n')
    result = CliRunner().invoke(app, ["--tenant", str(path), "--state-dir", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "Config 'accepted_domains' has value []." in result.output
