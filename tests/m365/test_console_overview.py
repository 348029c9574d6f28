"""The console's overview for OAuth upstreams in front of the sandbox: token expiry, last refresh and
the last AADSTS error, and the pacing headroom of the sending mailbox (real HTTP, real token endpoint)."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

import pytest

from relay365.sandbox.runner import Sandbox
from tests.console.support import running_console, wait_for
from tests.support import SECRET_ENV, submission


def send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.sendmail("scanner@contoso.test", ["partner@example.org"], b"Subject: paced\r\n\r\nx\r\n")


async def test_token_status_and_pacing_headroom(tmp_path: Path, sandbox: Sandbox) -> None:
    sections = {"transport": [submission(sandbox)], "delivery": {"poll_interval": 0.1}}
    async with running_console(tmp_path, **sections) as c, c.client() as http:
        http.headers["authorization"] = f"Bearer {c.viewer_token}"
        before = (await http.get("/api/overview")).json()["transports"][0]
        assert before["state"] == "idle" and before["token"]["last_refresh"] is None
        assert before["pacing"]["messages_left"] == 30 and before["pacing"]["sessions_max"] == 3
        await asyncio.to_thread(send, c.relay.ports["lan"])

        async def delivered() -> dict[str, object] | None:
            t = (await http.get("/api/overview")).json()["transports"][0]
            return t if t["state"] == "ok" else None

        t = await wait_for(delivered, what="the delivery")
        now = c.relay.clock()
        assert t["token"]["last_refresh"] <= now < t["token"]["expires_at"] and t["token"]["last_error"] == ""
        assert t["pacing"]["key"] == "mailbox:scanner@contoso.test"
        assert t["pacing"]["messages_left"] == 29 and t["pacing"]["recipients_left"] == 9999
        assert t["pacing"]["sessions_in_use"] == 0


async def test_last_aadsts_error_is_shown(
    tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, "not-the-secret")
    sections = {"transport": [submission(sandbox)], "delivery": {"poll_interval": 0.1, "min_backoff": 600}}
    async with running_console(tmp_path, **sections) as c, c.client() as http:
        http.headers["authorization"] = f"Bearer {c.viewer_token}"
        await asyncio.to_thread(send, c.relay.ports["lan"])

        async def failed() -> dict[str, object] | None:
            t = (await http.get("/api/overview")).json()["transports"][0]
            return t if t["token"]["last_error"] and t["state"] == "failing" else None

        t = await wait_for(failed, what="the token failure")
        assert "AADSTS7000215" in t["token"]["last_error"]
        assert t["last_reply"].startswith("454 4.7.0 token unavailable")
