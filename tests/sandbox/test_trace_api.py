"""Graph's message trace on the sandbox: filters, paging, details, permission, quota, error bodies."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from relay365.sandbox.clock import ManualClock
from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant_mailflow import MailFlowRule
from tests.sandbox.sandbox_helpers import ALICE, BOB, EXTERNAL, SCANNER, message
from tests.sandbox.trace_helpers import MAIL_APP, TRACES, direct_send, graph_token, tls, trace_tenant

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def traced(tmp_path: Path) -> AsyncIterator[Sandbox]:
    """A sandbox on a manual clock with six trace records from five Direct Send messages (one to Junk
    Email, one quarantined by a rule)."""
    rules = (MailFlowRule(name="hold", action="quarantine", subject_contains=("hold me",)),)
    async with Sandbox(trace_tenant(rules=rules), state_dir=tmp_path, clock=ManualClock()) as sandbox:
        await _send_five(sandbox)
        yield sandbox


async def _send_five(sandbox: Sandbox) -> None:
    await direct_send(sandbox, SCANNER, [ALICE, BOB], message(SCANNER, ALICE, "Report 1").as_bytes())
    await direct_send(sandbox, SCANNER, [ALICE], message(SCANNER, ALICE, "Report 2").as_bytes())
    await direct_send(
        sandbox, "printer@outside.test", [ALICE], message("printer@outside.test", ALICE, "Toner").as_bytes()
    )
    await direct_send(sandbox, BOB, [ALICE], message(BOB, ALICE, "Please hold me").as_bytes())
    await direct_send(sandbox, SCANNER, [BOB], message(SCANNER, BOB, "O'Brien's scan").as_bytes())


async def get(sandbox: Sandbox, url: str, token: str | None, **params: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(verify=tls(sandbox), timeout=20) as http:
        full = url if url.startswith("https://") else f"{sandbox.graph_url}{url}"
        return await http.get(full, headers=headers, params=params or None)


async def test_list_without_filter_pages_through_the_last_48_hours(traced: Sandbox) -> None:
    token = await graph_token(traced)
    first = await get(traced, TRACES, token, **{"$top": "2"})
    assert first.status_code == 200 and first.headers["request-id"]
    body = first.json()
    assert body["@odata.context"] == f"{traced.graph_url}/$metadata#admin/exchange/tracing/messageTraces"
    seen = list(body["value"])
    while "@odata.nextLink" in body:
        assert body["@odata.nextLink"].startswith(f"{traced.graph_url}{TRACES}?")
        body = (await get(traced, body["@odata.nextLink"], token)).json()
        seen += body["value"]
    assert len(seen) == 6 and len({(r["id"], r["recipientAddress"]) for r in seen}) == 6
    assert [r["receivedDateTime"] for r in seen] == sorted(
        (r["receivedDateTime"] for r in seen), reverse=True
    )
    assert set(seen[0]) == {
        "id", "senderAddress", "recipientAddress", "messageId", "receivedDateTime", "subject", "size",
        "fromIP", "toIP", "status",
    }  # fmt: skip
    statuses = {r["subject"]: r["status"] for r in seen if r["recipientAddress"] == ALICE}
    assert statuses == {
        "Report 1": "delivered",
        "Report 2": "delivered",
        "Toner": "filteredAsSpam",
        "Please hold me": "quarantined",
    }
    # Three days later the default 48 hours no longer see them; an explicit period does.
    traced.ctx.clock.advance(3 * 86400)
    token = await graph_token(traced)  # the first one expired meanwhile
    assert (await get(traced, TRACES, token)).json()["value"] == []
    now = traced.ctx.clock.now()
    period = f"receivedDateTime ge {_iso(now - 4 * 86400)} and receivedDateTime le {_iso(now)}"
    assert len((await get(traced, TRACES, token, **{"$filter": period})).json()["value"]) == 6


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_every_documented_filter(traced: Sandbox) -> None:
    token = await graph_token(traced)
    everything = (await get(traced, TRACES, token)).json()["value"]
    report = next(r for r in everything if r["subject"] == "Report 1" and r["recipientAddress"] == BOB)
    now = traced.ctx.clock.now()
    period = f"receivedDateTime ge {_iso(now - 3600)} and receivedDateTime le {_iso(now)}"
    cases = {
        f"senderAddress eq '{SCANNER.upper()}'": 4,
        f"recipientAddress eq '{BOB}'": 2,
        f"messageId eq '{report['messageId']}'": 2,
        f"messageId eq '{report['messageId'].strip('<>')}'": 2,  # with or without angle brackets
        f"id eq '{report['id']}'": 2,
        "status eq 'filteredAsSpam'": 1,
        "status eq 'Quarantined'": 1,
        "fromIP eq '127.0.0.1'": 6,
        "toIP eq ''": 6,
        "contains(subject, 'report')": 3,
        "startsWith(subject, 'Please')": 1,
        "endsWith(subject, 'scan')": 1,
        "contains(subject, 'O''Brien')": 1,
        f"{period} and senderAddress eq '{SCANNER}' and recipientAddress eq '{ALICE}'": 2,
        f"({period}) and (status eq 'delivered')": 4,
    }
    for clause, count in cases.items():
        response = await get(traced, TRACES, token, **{"$filter": clause})
        assert response.status_code == 200, (clause, response.text)
        assert len(response.json()["value"]) == count, clause


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"$filter": "status eq 'delivered' or status eq 'failed'"}, "the 'or' operator is not supported"),
        ({"$filter": "not (status eq 'delivered')"}, "the 'not' operator is not supported"),
        ({"$filter": "status eq 'lost'"}, "The value 'lost' is not valid for status"),
        ({"$filter": "size eq 5"}, "Invalid filter clause"),
        ({"$filter": "subject eq 'x'"}, "the property 'subject' cannot be filtered on"),
        ({"$filter": "senderAddress ne 'x@y'"}, "senderAddress supports only eq"),
        ({"$filter": "receivedDateTime gt 2026-01-01T00:00:00Z"}, "supports only ge and le"),
        ({"$filter": "receivedDateTime ge '2026-01-01T00:00:00Z'"}, "incompatible types"),
        ({"$filter": "receivedDateTime ge 2026-01-01T00:00:00Z"}, "Specify both bounds"),
        ({"$filter": "contains(senderAddress, 'x')"}, "supported only on subject"),
        ({"$filter": "(status eq 'delivered'"}, "expected"),
        ({"$top": "0"}, "Invalid $top value '0'"),
        ({"$top": "5001"}, "Invalid $top value '5001'"),
        ({"$select": "subject"}, "Query option '$select' is not supported"),
        ({"$skiptoken": "nonsense!"}, "The $skiptoken is not valid"),
    ],
)
async def test_bad_queries_get_graph_error_bodies(
    traced: Sandbox, params: dict[str, str], message: str
) -> None:
    token = await graph_token(traced)
    response = await get(traced, TRACES, token, **params)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "BadRequest" and message in error["message"]
    assert error["innerError"]["request-id"] == response.headers["request-id"]


async def test_time_period_rules(traced: Sandbox) -> None:
    """Both bounds, at most 10 days, starting at most 90 days back, ending no later than now."""
    token = await graph_token(traced)
    now = traced.ctx.clock.now()

    async def period(start: float, end: float) -> httpx.Response:
        return await get(
            traced,
            TRACES,
            token,
            **{"$filter": f"receivedDateTime ge {_iso(start)} and receivedDateTime le {_iso(end)}"},
        )

    assert (await period(now - 10 * 86400, now)).status_code == 200
    too_long = await period(now - 10 * 86400 - 2, now)
    assert too_long.status_code == 400 and "must not exceed 10 days" in too_long.text
    too_old = await period(now - 91 * 86400, now - 85 * 86400)
    assert too_old.status_code == 400 and "90 days" in too_old.text
    future = await period(now - 86400, now + 3600)
    assert future.status_code == 400 and "later than the current date" in future.text
    backwards = await period(now, now - 60)
    assert backwards.status_code == 400


async def test_details_by_recipient(traced: Sandbox) -> None:
    token = await graph_token(traced)
    rows = (await get(traced, TRACES, token, **{"$filter": "status eq 'filteredAsSpam'"})).json()["value"]
    [junk] = rows
    function = f"getDetailsByRecipient(recipientAddress='{junk['recipientAddress']}')"
    response = await get(traced, f"{TRACES}/{junk['id']}/{function}", token)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["@odata.context"].endswith("$metadata#Collection(microsoft.graph.exchangeMessageTraceDetail)")
    assert [e["event"] for e in body["value"]] == ["Receive", "Spam Diagnostics", "Deliver"]
    assert set(body["value"][0]) == {"id", "messageId", "dateTime", "event", "action", "description", "data"}
    assert all(e["id"] == junk["id"] and e["messageId"] == junk["messageId"] for e in body["value"])
    # The address may come percent-encoded (kiota's URI template does that) and quoted in any case.
    encoded = quote(f"getDetailsByRecipient(recipientAddress='{junk['recipientAddress'].upper()}')")
    assert (await get(traced, f"{TRACES}/{junk['id']}/{encoded}", token)).json()["value"] == body["value"]
    other = await get(
        traced, f"{TRACES}/{junk['id']}/getDetailsByRecipient(recipientAddress='{EXTERNAL}')", token
    )
    assert other.status_code == 200 and other.json()["value"] == []
    missing = await get(traced, f"{TRACES}/00000000-0000-0000-0000-000000000000/{function}", token)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "ResourceNotFound"
    wrong = await get(traced, f"{TRACES}/{junk['id']}/getDetails(recipientAddress='x')", token)
    assert wrong.status_code == 400


async def test_token_and_permission(traced: Sandbox) -> None:
    """No token: 401 as for all of Graph. A token without ExchangeMessageTrace.Read.All: 403 Forbidden,
    for the list and the details alike."""
    missing = await get(traced, TRACES, None)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "InvalidAuthenticationToken"
    mail_only = await graph_token(traced, MAIL_APP)
    for url in (TRACES, f"{TRACES}/x/getDetailsByRecipient(recipientAddress='{ALICE}')"):
        refused = await get(traced, url, mail_only)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"] | {"innerError": None} == {
            "code": "Forbidden",
            "message": "Missing role permissions on the request. API requires one of "
            "'ExchangeMessageTrace.Read.All'. Roles on the request 'Mail.Send'.",
            "innerError": None,
        }
    assert traced.ctx.store.rejections()["trace 403 Forbidden"] == 2


async def test_quota_of_100_requests_per_5_minutes_on_the_sandbox_clock(traced: Sandbox) -> None:
    token = await graph_token(traced)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(verify=tls(traced), timeout=20) as http:
        url = f"{traced.graph_url}{TRACES}"
        answers = [await http.get(url, headers=headers, params={"$top": "1"}) for _ in range(60)]
        traced.ctx.clock.advance(100)
        answers += [await http.get(f"{url}/x/getDetailsByRecipient(recipientAddress='a@b')", headers=headers)
                    for _ in range(40)]  # fmt: skip
        assert {a.status_code for a in answers} == {200, 404}  # 100 accepted: details share the quota
        throttled = await http.get(url, headers=headers)
        assert throttled.status_code == 429
        assert throttled.headers["Retry-After"] == "200"  # the first 60 leave the window at t+300
        error = throttled.json()["error"]
        assert error["code"] == "TooManyRequests" and "100 requests per 300 seconds" in error["message"]
        traced.ctx.clock.advance(199)
        assert (await http.get(url, headers=headers)).status_code == 429
        traced.ctx.clock.advance(1)
        assert (await http.get(url, headers=headers)).status_code == 200
    assert traced.ctx.store.rejections()["trace 429 TooManyRequests"] == 2


async def test_concurrent_clients_share_one_quota(traced: Sandbox) -> None:
    traced.ctx.tenant = _limited(traced, 10)
    token = await graph_token(traced)
    async with httpx.AsyncClient(verify=tls(traced), timeout=20) as http:
        url = f"{traced.graph_url}{TRACES}"
        answers = await asyncio.gather(
            *(http.get(url, headers={"Authorization": f"Bearer {token}"}) for _ in range(25))
        )
    assert sorted(a.status_code for a in answers) == [200] * 10 + [429] * 15


def _limited(sandbox: Sandbox, requests: int) -> Any:
    tenant = sandbox.ctx.tenant
    return dataclasses.replace(
        tenant, limits=dataclasses.replace(tenant.limits, trace_requests_per_window=requests)
    )
