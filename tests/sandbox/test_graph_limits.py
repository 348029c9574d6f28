"""Graph throttling (429 + Retry-After), faults on demand and the admin API, with httpx."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.sandbox.http_fixtures import ALICE, SCANNER, SECRET, SECRET_APP, HttpSandbox, http_sandbox

__all__ = ["http_sandbox"]

GRAPH = "https://graph.microsoft.com"
MESSAGE = {
    "message": {
        "subject": "limits",
        "body": {"contentType": "Text", "content": "x"},
        "toRecipients": [{"emailAddress": {"address": ALICE}}],
    }
}


async def token(sandbox: HttpSandbox, client: httpx.AsyncClient) -> str:
    reply = await client.post(
        f"{sandbox.authority}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": SECRET_APP,
            "client_secret": SECRET,
            "scope": f"{GRAPH}/.default",
        },
    )
    assert reply.status_code == 200, reply.text
    return str(reply.json()["access_token"])


async def wait_for(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_concurrency_limit_is_429_with_retry_after(http_sandbox: HttpSandbox) -> None:
    http_sandbox.set_limits(graph_concurrent_per_mailbox=2)
    graph = http_sandbox.app.state.graph
    url = f"{http_sandbox.graph_url}/users/{SCANNER}/sendMail"
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'{"message": '
        await release.wait()
        yield json.dumps(MESSAGE["message"]).encode() + b"}"

    async with httpx.AsyncClient(verify=http_sandbox.ssl_context(), timeout=20) as client:
        headers = {"Authorization": f"Bearer {await token(http_sandbox, client)}"}
        slow = [asyncio.create_task(client.post(url, headers=headers, content=slow_body())) for _ in range(2)]
        try:
            await wait_for(lambda: graph.in_flight(SECRET_APP, SCANNER) == 2)
            third = await client.post(url, headers=headers, json=MESSAGE)
            assert third.status_code == 429
            assert third.json()["error"]["code"] == "ApplicationThrottled"
            assert third.json()["error"]["message"] == ("Application is over its MailboxConcurrency limit.")
            assert int(third.headers["Retry-After"]) >= 1
        finally:
            release.set()
            done = await asyncio.wait_for(asyncio.gather(*slow), timeout=10)
        assert [r.status_code for r in done] == [202, 202]
        after = await client.post(url, headers=headers, json=MESSAGE)
        assert after.status_code == 202
    assert http_sandbox.ctx.store.rejections() == {"graph 429 ApplicationThrottled": 1}
    assert len(http_sandbox.ctx.store.list(mailbox=ALICE)) == 3


async def test_request_rate_limit_and_window(http_sandbox: HttpSandbox) -> None:
    http_sandbox.set_limits(graph_requests_per_window=3, graph_window_seconds=600)
    url = f"{http_sandbox.graph_url}/users/{SCANNER}/sendMail"
    async with httpx.AsyncClient(verify=http_sandbox.ssl_context(), timeout=20) as client:
        headers = {"Authorization": f"Bearer {await token(http_sandbox, client)}"}
        for _ in range(3):
            assert (await client.post(url, headers=headers, json=MESSAGE)).status_code == 202
        limited = await client.post(url, headers=headers, json=MESSAGE)
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "ApplicationThrottled"
        assert 590 <= int(limited.headers["Retry-After"]) <= 600
        # Another mailbox of the same app has its own budget.
        other = f"{http_sandbox.graph_url}/users/noreply@contoso.test/sendMail"
        assert (await client.post(other, headers=headers, json=MESSAGE)).status_code == 202
        http_sandbox.ctx.clock.advance(601)
        headers = {"Authorization": f"Bearer {await token(http_sandbox, client)}"}
        assert (await client.post(url, headers=headers, json=MESSAGE)).status_code == 202


def _client(sandbox: HttpSandbox) -> httpx.Client:
    return httpx.Client(verify=sandbox.ssl_context(), timeout=20)


def test_graph_fault_reply_then_recovery(http_sandbox: HttpSandbox) -> None:
    with _client(http_sandbox) as client:
        added = client.post(
            f"{http_sandbox.base_url}/_sandbox/faults",
            json={
                "endpoint": "graph",
                "stage": "request",
                "action": "reply",
                "reply": "503",
                "headers": {"Retry-After": "7"},
                "times": 2,
            },
        )
        assert added.status_code == 200, added.text
        assert added.json()["faults"][0]["times"] == 2
        reply = client.post(
            f"{http_sandbox.authority}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": SECRET_APP,
                "client_secret": SECRET,
                "scope": f"{GRAPH}/.default",
            },
        )
        headers = {"Authorization": f"Bearer {reply.json()['access_token']}"}
        url = f"{http_sandbox.graph_url}/users/{SCANNER}/sendMail"
        for _ in range(2):
            failed = client.post(url, headers=headers, json=MESSAGE)
            assert failed.status_code == 503
            assert failed.headers["Retry-After"] == "7"
            assert failed.json()["error"]["code"] == "ServiceNotAvailable"
        assert client.post(url, headers=headers, json=MESSAGE).status_code == 202
        rejections = client.get(f"{http_sandbox.base_url}/_sandbox/rejections").json()
        assert rejections == {"graph 503 fault": 2}


def test_graph_fault_drop_and_stall(http_sandbox: HttpSandbox) -> None:
    faults = http_sandbox.ctx.faults
    from relay365.sandbox.faults import Fault

    with _client(http_sandbox) as client:
        url = f"{http_sandbox.graph_url}/users/{SCANNER}/sendMail"
        faults.add(Fault(endpoint="graph", stage="request", action="drop"))
        with pytest.raises(httpx.RemoteProtocolError):
            client.post(url, json=MESSAGE)
        faults.add(Fault(endpoint="graph", stage="request", action="stall", stall_seconds=0.4))
        started = time.monotonic()
        stalled = client.post(url, json=MESSAGE)
        assert time.monotonic() - started >= 0.4
        assert stalled.status_code == 401  # after the stall the request proceeds normally


def test_token_fault(http_sandbox: HttpSandbox) -> None:
    with _client(http_sandbox) as client:
        client.post(
            f"{http_sandbox.base_url}/_sandbox/faults",
            json={"endpoint": "token", "stage": "request", "reply": "503"},
        )
        data = {
            "grant_type": "client_credentials",
            "client_id": SECRET_APP,
            "client_secret": SECRET,
            "scope": f"{GRAPH}/.default",
        }
        url = f"{http_sandbox.authority}/oauth2/v2.0/token"
        failed = client.post(url, data=data)
        assert failed.status_code == 503
        assert failed.json()["error"] == "temporarily_unavailable"
        assert client.post(url, data=data).status_code == 200


def test_admin_api_lists_messages_and_advances_clock(http_sandbox: HttpSandbox) -> None:
    with _client(http_sandbox) as client:
        base = http_sandbox.base_url
        data = {
            "grant_type": "client_credentials",
            "client_id": SECRET_APP,
            "client_secret": SECRET,
            "scope": f"{GRAPH}/.default",
        }
        access = client.post(f"{http_sandbox.authority}/oauth2/v2.0/token", data=data).json()
        headers = {"Authorization": f"Bearer {access['access_token']}"}
        sent = client.post(
            f"{http_sandbox.graph_url}/users/{SCANNER}/sendMail", headers=headers, json=MESSAGE
        )
        assert sent.status_code == 202
        listed = client.get(f"{base}/_sandbox/messages", params={"mailbox": ALICE}).json()
        assert [m["folder"] for m in listed["messages"]] == ["Inbox"]
        first = listed["messages"][0]
        shown = client.get(f"{base}/_sandbox/messages/{first['id']}").json()
        assert shown["message"]["endpoint"] == "graph"
        assert "Subject: limits" in shown["content"]
        raw = client.get(f"{base}/_sandbox/messages/{first['id']}", params={"raw": "1"})
        assert raw.headers["content-type"] == "message/rfc822"
        assert client.get(f"{base}/_sandbox/messages/nope").status_code == 404
        before = http_sandbox.ctx.clock.now()
        moved = client.post(f"{base}/_sandbox/clock/advance", json={"seconds": 3600}).json()
        assert moved["now"] >= before + 3600
        bad = client.post(f"{base}/_sandbox/faults", json={"endpoint": "nowhere", "stage": "x"})
        assert bad.status_code == 400
