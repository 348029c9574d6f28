"""The ``relay365`` command line, run as subprocesses: config check, device passwd, and ``relay365 send``
against a listener (the queue commands are in test_cli_queue.py)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from relay365.credentials import hash_password, verify_password
from tests.support import (
    closed_port,
    run_cli,
    serving,
    smarthost_cfg,
    write_config,
)

APP_SECRET = "App-s3cret-2231-Qv"
QUEUE_ID = re.compile(r"\b[0-9A-F]{19}\b")


def test_config_check_valid(tmp_path: Path) -> None:
    config = write_config(tmp_path, transport=[smarthost_cfg(2525)])
    r = run_cli("config", "check", str(config))
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout and "1 listener(s), 1 device(s), 1 transport(s), 1 route(s)" in r.stdout


@pytest.mark.parametrize(
    ("sections", "key", "value"),
    [
        ({"listener": [{"name": "lan", "port": 70000}]}, "listener[0].port", "70000"),
        ({"delivery": {"min_backoff": "soon"}}, "delivery.min_backoff", "'soon'"),
        ({"transport": [smarthost_cfg(25, tls="sometimes")]}, "transport[0].tls", "'sometimes'"),
        ({"server": {"log_level": "LOUD"}}, "server.log_level", "'LOUD'"),
    ],
)
def test_config_check_invalid_names_key_and_value(
    tmp_path: Path, sections: dict[str, Any], key: str, value: str
) -> None:
    config = write_config(tmp_path, **sections)
    r = run_cli("config", "check", str(config))
    assert r.returncode == 2
    err = " ".join(r.stderr.split())
    assert f"'{key}'" in err and value in err, err


def test_config_check_unreadable_and_not_toml(tmp_path: Path) -> None:
    r = run_cli("config", "check", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "Cannot read it" in " ".join(r.stderr.split())
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nhostname = 1\n")
    r = run_cli("config", "check", str(bad))
    assert r.returncode == 2 and "Not valid TOML" in " ".join(r.stderr.split())


def test_device_passwd_from_stdin() -> None:
    secret = "Pr1nter-S3cret!"
    r = run_cli("device", "passwd", "printer-3f", "--password-stdin", stdin=secret + "\n")
    assert r.returncode == 0, r.stderr
    assert secret not in r.stdout + r.stderr
    m = re.search(r'^password_hash = "(\$argon2id\$[^"]+)"$', r.stdout, re.M)
    assert m is not None, r.stdout
    assert '[[device]] name = "printer-3f"' in r.stdout
    assert verify_password(m.group(1), secret)
    assert not verify_password(m.group(1), secret + "x")
    empty = run_cli("device", "passwd", "p", "--password-stdin", stdin="\n")
    assert empty.returncode == 2 and "empty password" in empty.stderr


@pytest.mark.slow
async def test_send_against_a_listener(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        transport=[smarthost_cfg(closed_port())],  # STARTTLS listener (self-signed), upstream down
        device=[
            {"name": "local", "ip_allow": ["127.0.0.0/8"], "allowed_senders": ["@contoso.com"]},
            {"name": "app", "password_hash": hash_password(APP_SECRET), "allowed_senders": ["*"]},
        ],
    )
    with serving(config, tmp_path / "serve.log") as server:
        target = f"127.0.0.1:{server.ports['lan']}"
        r = await asyncio.to_thread(
            run_cli,
            "send", "--server", target, "--from", "scanner@contoso.com",
            "--to", "alice@contoso.com", "--to", "bob@contoso.com",
            "--subject", "cli test", "--insecure",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "accepted" in r.stdout and "queued as" in r.stdout
        [qid] = QUEUE_ID.findall(r.stdout)
        r = await asyncio.to_thread(run_cli, "queue", "show", qid, "-c", str(config))
        assert "alice@contoso.com" in r.stdout and "bob@contoso.com" in r.stdout
        [path] = (tmp_path / "spool" / "messages").glob(f"*/{qid}")  # messages/<owner>/<queue id>
        body = path.read_bytes()
        assert b"Subject: cli test" in body and b"with ESMTPS" in body  # it used STARTTLS

        # Certificate verification is on by default: the listener's self-signed cert is refused.
        r = await asyncio.to_thread(run_cli, "send", "--server", target)
        assert r.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in r.stderr.replace("\n", "")
        # A refused sender is reported with the server's reply.
        r = await asyncio.to_thread(
            run_cli, "send", "--server", target, "--tls", "none", "--from", "x@fabrikam.com"
        )
        assert r.returncode == 1
        assert "550 5.7.1 Device local may not send as <x@fabrikam.com>" in " ".join(r.stderr.split())

        # SMTP AUTH over STARTTLS with the password from the environment.
        auth = ("send", "--server", target, "--insecure", "--user", "app", "--password-env", "APP_PW")
        env = {"APP_PW": APP_SECRET}
        r = await asyncio.to_thread(run_cli, *auth, "--from", "x@fabrikam.com", env=env)
        assert r.returncode == 0, r.stderr
        [qid] = QUEUE_ID.findall(r.stdout)
        r = await asyncio.to_thread(run_cli, "queue", "show", qid, "-c", str(config))
        assert "device=app" in r.stdout and "from=<x@fabrikam.com>" in r.stdout
        r = await asyncio.to_thread(run_cli, *auth, env={"APP_PW": "wrong-password"})
        assert r.returncode == 1 and "535 5.7.8" in r.stderr
        r = await asyncio.to_thread(run_cli, *auth, env={})
        assert r.returncode == 1 and "--user needs --password-env" in " ".join(r.stderr.split())
        assert APP_SECRET not in server.log_text()
    r = await asyncio.to_thread(run_cli, "send", "--server", f"127.0.0.1:{closed_port()}", "--tls", "none")
    assert r.returncode == 1 and "error" in r.stderr
