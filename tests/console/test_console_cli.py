"""``relay365 admin passwd/token/list/remove`` and ``relay365 trace`` as subprocesses, against the files a
real relay wrote, and the accounts they make logging in over real HTTP."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import smtplib
from pathlib import Path

import httpx
import pytest

from relay365.service.relay import Relay
from relay365.settings import load_settings
from tests.support import RecordingUpstream, run_cli, smarthost, write_config


def send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail("scan@contoso.com", ["alice@contoso.com"], b"Subject: Floor 3 scan\r\n\r\nx\r\n")
        s.ehlo()
        s.mail("scan@contoso.com")
        s.rcpt("x@y.z")
        s.rset()


@pytest.mark.slow
async def test_admin_accounts_tokens_and_trace_cli(tmp_path: Path) -> None:
    upstream = await RecordingUpstream().start()
    try:
        device = {"name": "local", "ip_allow": ["127.0.0.0/8"], "allowed_recipient_domains": ["contoso.com"]}
        config = write_config(
            tmp_path, transport=[smarthost(upstream.port)], admin={"port": 0}, device=[device]
        )
        cfg = str(config)
        made = await asyncio.to_thread(
            run_cli, "admin", "passwd", "alice", "--role", "viewer", "--password-stdin", "-c", cfg,
            stdin="correct horse battery\n",
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        users = tmp_path / "spool" / "admin-users.json"
        assert oct(users.stat().st_mode & 0o777) == "0o600"
        assert "correct horse" not in users.read_text() and "$argon2id$" in users.read_text()
        short = await asyncio.to_thread(
            run_cli, "admin", "passwd", "bob", "--password-stdin", "-c", cfg, stdin="x\n"
        )
        assert short.returncode == 2 and "at least 8" in short.stderr
        bad_role = await asyncio.to_thread(
            run_cli,
            "admin",
            "passwd",
            "bob",
            "--role",
            "root",
            "--password-stdin",
            "-c",
            cfg,
            stdin="12345678\n",
        )
        assert bad_role.returncode == 2 and "viewer or operator" in bad_role.stderr
        token = await asyncio.to_thread(
            run_cli, "admin", "token", "create", "ci", "--role", "operator", "-c", cfg
        )
        assert token.returncode == 0 and token.stdout.startswith("r365_")
        listing = await asyncio.to_thread(run_cli, "admin", "list", "-c", cfg)
        assert "alice" in listing.stdout and "viewer" in listing.stdout and "ci (" in listing.stdout
        assert token.stdout.strip()[14:] not in listing.stdout  # the secret is never shown again

        relay = Relay(load_settings(config))
        await relay.start()
        try:
            await asyncio.to_thread(send, relay.ports["lan"])
            await upstream.wait_for(1)
            async with httpx.AsyncClient(base_url=relay.admin_url, trust_env=False, timeout=20) as http:
                r = await http.post("/login", data={"username": "alice", "password": "correct horse battery"})
                assert r.status_code == 303
                hdr = {"authorization": f"Bearer {token.stdout.strip()}"}
                assert (await http.get("/api/trace", headers=hdr)).status_code == 200
                await asyncio.to_thread(run_cli, "admin", "token", "revoke", token.stdout[5:13], "-c", cfg)
                assert (await http.get("/api/trace", headers=hdr)).status_code == 401
                await asyncio.to_thread(run_cli, "admin", "remove", "alice", "-c", cfg)
                assert (await http.get("/api/trace")).status_code == 401  # the session ended with the account
            await relay.tracking.flush()
            found = await asyncio.to_thread(
                run_cli, "trace", "--recipient", "alice@contoso.com", "--json", "-c", cfg
            )
            assert found.returncode == 0, found.stderr
            events = [json.loads(line) for line in found.stdout.splitlines()]
            assert [e["kind"] for e in events][-1] == "received" and events[-1]["subject"] == "Floor 3 scan"
            deadline = asyncio.get_running_loop().time() + 10
            while events[0]["kind"] != "delivered":
                assert asyncio.get_running_loop().time() < deadline, events
                await asyncio.sleep(0.1)
                await relay.tracking.flush()
                found = await asyncio.to_thread(
                    run_cli, "trace", "--recipient", "alice@contoso.com", "--json", "-c", cfg
                )
                events = [json.loads(line) for line in found.stdout.splitlines()]
            table = await asyncio.to_thread(run_cli, "trace", "--kind", "refused", "-c", cfg)
            assert "x@y.z" in table.stdout and "refused" in table.stdout
            exported = await asyncio.to_thread(run_cli, "trace", "--subject", "floor 3", "--csv", "-c", cfg)
            rows = list(csv.DictReader(io.StringIO(exported.stdout)))
            assert rows and all(r["subject"] == "Floor 3 scan" for r in rows)
            bad = await asyncio.to_thread(run_cli, "trace", "--since", "last week", "-c", cfg)
            assert bad.returncode == 2 and "since must be a time" in bad.stderr
        finally:
            await relay.stop(grace=5)
    finally:
        await upstream.stop()


def test_trace_without_a_tracking_log(tmp_path: Path) -> None:
    r = run_cli("trace", "-c", str(write_config(tmp_path)))
    assert r.returncode == 2 and "no tracking log" in r.stderr
