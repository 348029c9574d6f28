"""The admin endpoint: Prometheus metrics, health and the queue view, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from relay365.admin.accounts import AccountStore, Role
from tests.support import closed_port, make_settings, running_relay, smarthost


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def send_two_and_one_refused(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        for i in range(2):
            s.sendmail("scan@contoso.com", ["bob@contoso.com"], f"Subject: {i}\r\n\r\nx\r\n".encode())
        code, _ = s.docmd("RCPT TO:<nobody@contoso.com>")  # no MAIL yet: 503
        return code


async def test_metrics_health_and_queue(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        transport=[smarthost(closed_port())],  # upstream down: the mail stays queued
        delivery={"min_backoff": 600, "max_backoff": 600, "poll_interval": 0.1},
        admin={"port": 0},
    )
    token = AccountStore(tmp_path / "spool" / "admin-users.json").create_token("ci", Role.VIEWER)
    async with running_relay(settings) as relay:
        assert relay.admin is not None and relay.admin.port > 0
        assert await asyncio.to_thread(send_two_and_one_refused, relay.ports["lan"]) == 503
        base = f"http://127.0.0.1:{relay.admin.port}"
        auth = {"authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=10, headers=auth) as http:
            deadline = asyncio.get_running_loop().time() + 10
            while True:  # the first delivery attempt fails and holds the transport back
                got = samples((await http.get("/metrics")).text)
                if got.get(("relay365_transport_suspended", (("transport", "up"),))) == 1.0:
                    break
                assert asyncio.get_running_loop().time() < deadline, got
                await asyncio.sleep(0.1)
            reply = await http.get("/metrics")
            assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
            got = samples(reply.text)
            accepted = ("relay365_messages_accepted_total", (("device", "local"), ("listener", "lan")))
            assert got[accepted] == 2.0
            assert got[("relay365_smtp_refusals_total", (("code", "503"), ("status", "5.5.1")))] == 1.0
            transient = (("outcome", "transient"), ("transport", "up"))
            assert got[("relay365_delivery_results_total", transient)] >= 1.0
            open_rcpts = sum(
                got[("relay365_queue_recipients", (("state", state),))] for state in ("queued", "deferred")
            )
            assert open_rcpts == 2.0
            assert got[("relay365_queue_recipients", (("state", "delivered"),))] == 0.0
            assert got[("relay365_queue_oldest_seconds", ())] >= 0.0

            health = (await http.get("/api/health")).json()
            assert health["status"] == "ok" and health["listeners"] == relay.ports
            assert sum(health["queue"]["recipients"].values()) == 2
            assert "up" in health["suspended_transports"]

            queue = (await http.get("/api/queue", params={"limit": 1})).json()
            assert queue["total"] == 2 and len(queue["messages"]) == 1
            [rcpt] = queue["messages"][0]["recipients"]
            assert rcpt["rcpt"] == "bob@contoso.com" and rcpt["state"] in ("queued", "deferred")
            for bad in ("0", "abc", "5000"):
                refused = await http.get("/api/queue", params={"limit": bad})
                assert refused.status_code == 400 and "limit" in refused.json()["error"]
            assert (await http.post("/api/queue")).status_code == 405
    # Stopped with the relay.
    with httpx.Client(trust_env=False, timeout=2) as http:
        try:
            http.get(f"{base}/api/health")
            raise AssertionError("the admin endpoint still answers after stop")
        except httpx.ConnectError:
            pass


async def test_no_admin_endpoint_unless_configured(tmp_path: Path) -> None:
    async with running_relay(make_settings(tmp_path)) as relay:
        assert relay.admin is None
