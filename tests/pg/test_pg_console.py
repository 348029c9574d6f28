"""The admin console and API on the PostgreSQL spool: one node's console shows and acts on the queue
and the message trace of every node (real HTTP on 127.0.0.1, two relays on one database)."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

import pytest

from tests.conftest import make_settings, running_relay, smarthost
from tests.console.support import bearer, running_console, wait_for
from tests.core.helpers import closed_port
from tests.pgcluster import PgDatabase

PASSWORD_ENV = "RELAY365_TEST_PG_PASSWORD"
NO_TLS = [{"name": "lan", "port": 0, "tls": "none"}]


def send(port: int, subject: str) -> str:
    body = f"From: scan@contoso.com\r\nSubject: {subject}\r\nMessage-ID: <{subject}@mfp>\r\n\r\nx\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("mfp.lan")
        s.mail("scan@contoso.com")
        s.rcpt("user@contoso.com")
        code, reply = s.data(body.encode())
        assert code == 250
        return reply.decode().split()[-1]


async def test_one_nodes_console_sees_and_acts_on_every_nodes_queue_and_trace(
    tmp_path: Path, pg: PgDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, pg.password)
    shared = {
        "spool": {"url": pg.url, "password_env": PASSWORD_ENV},
        "listener": NO_TLS,
        "transport": [smarthost(closed_port())],
        "delivery": {"min_backoff": 600, "max_backoff": 600, "poll_interval": 0.2},
    }
    other = make_settings(tmp_path / "b", **shared)
    async with (
        running_relay(other) as node_b,
        running_console(tmp_path / "a", **shared) as c,
        c.client(headers=bearer(c.token)) as http,
    ):
        qid = await asyncio.to_thread(send, node_b.ports["lan"], "from-b")

        async def listed() -> bool:
            page = (await http.get("/api/queue", params={"state": "open"})).json()
            return any(m["queue_id"] == qid for m in page["messages"])

        await wait_for(listed, what="node B's message in node A's console")
        raw = await http.get(f"/api/queue/{qid}/raw")
        assert raw.status_code == 200 and raw.content.endswith(b"x\r\n")

        async def traced() -> bool:  # node B's tracking events, in node A's message view
            view = (await http.get(f"/api/queue/{qid}")).json()
            return "received" in [e["kind"] for e in view["events"]]

        await wait_for(traced, what="node B's tracking events in node A's view")
        view = (await http.get(f"/api/queue/{qid}")).json()
        assert dict(view["headers"])["Subject"] == "from-b"
        found = (await http.get("/api/trace", params={"message_id": "from-b@mfp"})).json()
        assert "received" in [e["kind"] for e in found["events"]]
        assert (await http.post(f"/api/queue/{qid}/hold")).status_code == 200
        assert (await node_b.spool.get(qid)).held  # node B sees node A's action
        assert (await http.post(f"/api/queue/{qid}/delete")).status_code == 200
        gone = (await http.get(f"/api/queue/{qid}")).json()
        assert gone["entry"] is None
        assert await node_b.spool.list() == []
