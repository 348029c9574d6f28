"""Secrets never reach a log or the spool: a full ``relay365 serve`` run at DEBUG with a device that
authenticates (AUTH PLAIN via smtplib, AUTH LOGIN via swaks, one wrong password) and an upstream that
requires AUTH over STARTTLS (password from a 0600 file or from the environment), in every log format
(text, journal, json), then a grep."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import smtplib
import ssl
import subprocess
from pathlib import Path

import pytest

from relay365.credentials import hash_password, load_secret
from relay365.errors import SecretError
from relay365.settings import SecretRef
from tests.support import RecordingUpstream, ServeProcess, run_cli, spool_files, write_config

DEVICE_SECRET = "Dev1ce-pw-7319-Kx"
WRONG_SECRET = "Wr0ng-pw-4410-Zq"
UPSTREAM_SECRET = "Upstr3am-pw-5521-Jm"
UPSTREAM_USER = "relay@contoso.com"


def forms(user: str, secret: str) -> list[bytes]:
    """The secret as it could leak: clear, AUTH LOGIN base64, AUTH PLAIN base64."""
    raw = secret.encode()
    return [
        raw,
        base64.b64encode(raw),
        base64.b64encode(b"\0" + user.encode() + b"\0" + raw),
        base64.b64encode(user.encode() + b"\0" + user.encode() + b"\0" + raw),
    ]


def device_session(port: int, password: str) -> int:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.starttls(context=ctx)
        try:
            s.login("printer", password)
        except smtplib.SMTPAuthenticationError as e:
            return int(e.smtp_code)
        s.sendmail("scanner@contoso.com", ["alice@contoso.com"], b"Subject: plain\r\n\r\nvia smtplib\r\n")
        return 235


def check_format(log: str, log_format: str) -> None:
    """The run logged at DEBUG, the AUTH events included, each line in ``log_format``."""
    lines = log.splitlines()
    if log_format == "text":
        assert " DEBUG " in log
        events = log
    elif log_format == "journal":
        # sd-daemon(3) priority prefixes on every line, no timestamp (the journal adds its own)
        bad = [
            line for line in lines if not re.match(r"<[0-7]>\S", line) or re.search(r"\d\d:\d\d:\d\d", line)
        ]
        assert not bad, bad
        assert any(line.startswith("<7>") for line in lines) and "<4>relay365.ingress" in log
        events = log
    else:
        records = [json.loads(line) for line in lines]
        assert {"DEBUG", "INFO", "WARNING"} <= {r["level"] for r in records}
        authenticated = [r for r in records if r["message"].startswith("authenticated peer=")]
        assert authenticated and authenticated[0]["peer"] == "127.0.0.1"
        assert authenticated[0]["device"] == "printer"
        events = "\n".join(r["message"] for r in records)
    assert "refused peer=127.0.0.1 device=- listener=lan command=AUTH" in events
    assert "authenticated peer=127.0.0.1 device=printer" in events


@pytest.mark.parametrize(
    ("source", "log_format"), [("file", "text"), ("env", "text"), ("file", "json"), ("env", "journal")]
)
async def test_no_secret_in_logs_or_spool(
    tmp_path: Path, server_cert: tuple[Path, Path], ca_file: Path, source: str, log_format: str
) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(*map(str, server_cert))
    logins: list[tuple[str, str]] = []

    def check(user: str, password: str) -> bool:
        logins.append((user, password))
        return (user, password) == (UPSTREAM_USER, UPSTREAM_SECRET)

    upstream = await RecordingUpstream(tls_context=server_ctx, require_starttls=True, auth=check).start()
    env = dict(os.environ)
    if source == "file":
        secret_file = tmp_path / "upstream.secret"
        secret_file.write_text(UPSTREAM_SECRET + "\n")
        secret_file.chmod(0o600)
        password: dict[str, str] = {"password_file": str(secret_file)}
    else:
        env["RELAY365_TEST_UPSTREAM_PW"] = UPSTREAM_SECRET
        password = {"password_env": "RELAY365_TEST_UPSTREAM_PW"}
    cert, key = server_cert
    config = write_config(
        tmp_path,
        server={"log_level": "DEBUG", "log_format": log_format},
        listener=[
            {"name": "lan", "port": 0, "tls": "starttls", "cert_file": str(cert), "key_file": str(key)}
        ],
        device=[{"name": "printer", "password_hash": hash_password(DEVICE_SECRET)}],
        transport=[
            {
                "name": "up",
                "type": "smarthost",
                "host": "127.0.0.1",
                "port": upstream.port,
                "tls": "required",
                "ca_file": str(ca_file),
                "username": UPSTREAM_USER,
                **password,
            }
        ],
    )
    server = ServeProcess(config, tmp_path / "serve.log", env).start()
    try:
        port = server.ports["lan"]
        assert await asyncio.to_thread(device_session, port, WRONG_SECRET) == 535
        assert await asyncio.to_thread(device_session, port, DEVICE_SECRET) == 235
        swaks = await asyncio.to_thread(
            subprocess.run,
            ["swaks", "--server", f"127.0.0.1:{port}", "--tls", "--auth", "LOGIN",
             "--auth-user", "printer", "--auth-password", DEVICE_SECRET,
             "--from", "scanner@contoso.com", "--to", "bob@contoso.com", "--header", "Subject: swaks"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert swaks.returncode == 0, swaks.stdout + swaks.stderr
        await upstream.wait_for(2, timeout=20)
        assert server.terminate() == 0
    finally:
        server.kill()
        await upstream.stop()

    # The upstream saw our login, over TLS only.
    assert len(upstream.messages) == 2 and all(m.tls for m in upstream.messages)
    assert logins and set(logins) == {(UPSTREAM_USER, UPSTREAM_SECRET)}
    log = server.log_text()
    check_format(log, log_format)
    leaks = (
        forms("printer", DEVICE_SECRET)
        + forms("printer", WRONG_SECRET)
        + forms(UPSTREAM_USER, UPSTREAM_SECRET)
    )
    for leak in leaks:
        assert leak.decode() not in log, f"secret form {leak!r} in the log"
    files = spool_files(tmp_path / "spool")
    assert any(p.name == "queue.db" for p in files)
    for p in files:
        data = p.read_bytes()
        for leak in leaks:
            assert leak not in data, f"secret form {leak!r} in {p}"


def test_load_secret_refuses_group_or_world_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(UPSTREAM_SECRET)
    ref = SecretRef(key="transport[0].password", file=path)
    for mode in (0o644, 0o640, 0o604):
        path.chmod(mode)
        with pytest.raises(SecretError) as e:
            load_secret(ref)
        assert "chmod 600" in str(e.value) and f"{mode:o}" in str(e.value)
        assert UPSTREAM_SECRET not in str(e.value)
    path.chmod(0o600)
    assert load_secret(ref) == UPSTREAM_SECRET
    with pytest.raises(SecretError, match="RELAY365_UNSET_VAR is not set"):
        load_secret(SecretRef(key="k", env="RELAY365_UNSET_VAR"), environ={})


def test_serve_refuses_readable_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(UPSTREAM_SECRET)
    path.chmod(0o644)
    config = write_config(
        tmp_path,
        transport=[{"name": "up", "type": "smarthost", "port": 2525, "tls": "required",
                    "username": "u", "password_file": str(path)}],
    )  # fmt: skip
    r = run_cli("serve", "-c", str(config), timeout=60)
    assert r.returncode == 2
    assert "chmod 600" in " ".join(r.stderr.split())
    assert UPSTREAM_SECRET not in r.stdout + r.stderr
    assert shutil.which("swaks") is not None
