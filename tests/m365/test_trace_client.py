"""relay365's message trace client against the sandbox's Graph, tokens from the real msal flow.

The sandbox runs on a manual clock; the client's budget and pauses run on the same clock (a pause
advances it), so five-minute windows pass in no time and nothing depends on wall-clock margins.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiosmtplib
import httpx
import pytest

from relay365.errors import TracePermissionError, TraceUnavailableError
from relay365.oauth import GRAPH_SCOPE
from relay365.sandbox.clock import ManualClock
from relay365.sandbox.faults import Fault
from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import AppRegistration, example_tenant
from relay365.settings import M365Options, SecretRef, TransportSettings
from relay365.tracing import MessageTraceClient, TokenBucket, TraceRequest, TraceStatus

try:  # relay365.oauth owns token_source once the seams branch is merged
    from relay365.oauth import token_source
except ImportError:
    from relay365.transports.submission import token_source

pytestmark = pytest.mark.timeout(300)

APP_ID = "11111111-2222-3333-4444-555555555555"  # the example tenant's relay365 app: has the permission
MAIL_ONLY = "12121212-3434-4565-8787-909090909090"
SECRET_ENV = "RELAY365_TEST_TRACE_SECRET"
SECRET = "sandbox-secret-relay365"
TRACES = "/admin/exchange/tracing/messageTraces"


@pytest.fixture
async def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Sandbox]:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    base = example_tenant()
    apps = dict(base.apps)
    apps[MAIL_ONLY] = AppRegistration(
        client_id=MAIL_ONLY, client_secret=SECRET, permissions=frozenset({"Mail.Send"})
    )
    tenant = dataclasses.replace(base, apps=apps)
    async with Sandbox(tenant, state_dir=tmp_path / "sandbox", clock=ManualClock()) as sb:
        yield sb


def graph_transport(sb: Sandbox, client_id: str = APP_ID) -> TransportSettings:
    return TransportSettings(
        name="graph",
        type="graph",
        ca_file=sb.ca_path,
        m365=M365Options(
            mailbox="scanner@contoso.test",
            tenant=sb.ctx.tenant.tenant_id,
            client_id=client_id,
            client_secret=SecretRef(key="client_secret", env=SECRET_ENV),
            authority=sb.base_url,
            authority_ca_file=sb.ca_path,
            graph_url=sb.graph_url,
        ),
    )


@pytest.fixture
def client_for(sandbox: Sandbox) -> Iterator[Callable[..., MessageTraceClient]]:
    """``client_for(client_id=..., **options)``: the client as the follower will build it, with its
    clock and pauses on the sandbox clock; the token sources are closed after the test."""
    clock = sandbox.ctx.clock
    opened: list[Any] = []

    async def pause(seconds: float) -> None:
        clock.advance(seconds)
        await asyncio.sleep(0)

    def build(client_id: str = APP_ID, **options: Any) -> MessageTraceClient:
        settings = graph_transport(sandbox, client_id)
        budget = options.pop("budget", None) or TokenBucket.for_quota(clock=clock.now, sleep=pause)
        tokens = token_source(settings, scope=GRAPH_SCOPE)  # msal against the sandbox's authority
        opened.append(tokens)
        return MessageTraceClient.for_transport(
            settings, tokens=tokens, budget=budget, wallclock=clock.now, sleep=pause, **options
        )

    yield build
    for tokens in opened:
        tokens.close()


async def admin_token(sb: Sandbox) -> str:
    """A token of the same app, as an admin's own script would get it (msal, client credentials)."""
    tokens = token_source(graph_transport(sb), scope=GRAPH_SCOPE)
    try:
        return await tokens.token()
    finally:
        tokens.close()


def mail(sender: str, rcpt: str, number: int, subject: str = "Scan") -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, rcpt, f"{subject} {number}"
    msg["Message-ID"] = f"<scan-{number}@relay.contoso.test>"
    msg.set_content("page\n")
    return msg


async def send_batch(sb: Sandbox, messages: list[tuple[str, list[str], EmailMessage]]) -> None:
    """Direct Send over four SMTP sessions at once, as the relay's direct_send transport would."""

    async def session(part: list[tuple[str, list[str], EmailMessage]]) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sb.mx_port, start_tls=False, timeout=30)
        await client.connect()
        for sender, rcpts, msg in part:
            errors, _ = await client.sendmail(sender, rcpts, msg.as_bytes())
            assert errors == {}
        await client.quit()

    await asyncio.gather(*(session(messages[i::4]) for i in range(4)))


@pytest.mark.slow
async def test_two_thousand_messages_traced_without_a_single_429(
    sandbox: Sandbox, client_for: Callable[..., MessageTraceClient]
) -> None:
    """2,000 messages over 13 days: 1,780 delivered, 200 in Junk Email (fabrikam.test's SPF lacks the
    office IP), 20 quarantined by the example tenant's rule. The client finds every one and reads
    the events of the 220 that did not reach the Inbox, paced inside 80 of the tenant's 100 requests
    per 5 minutes: the sandbox counts no 429."""
    clock = sandbox.ctx.clock
    requests: list[TraceRequest] = []
    expected: dict[str, TraceStatus] = {}
    for batch in range(4):
        messages = []
        for n in range(batch * 500, batch * 500 + 500):
            if n % 100 == 7:
                sender, subject, status = (
                    "scanner@contoso.test",
                    "[quarantine-test] Scan",
                    TraceStatus.QUARANTINED,
                )
            elif n % 10 == 3:
                sender, subject, status = "bob@fabrikam.test", "Scan", TraceStatus.FILTERED_AS_SPAM
            else:
                sender, subject, status = "scanner@contoso.test", "Scan", TraceStatus.DELIVERED
            rcpt = "alice@contoso.test"
            messages.append((sender, [rcpt], mail(sender, rcpt, n, subject)))
            requests.append(TraceRequest(f"<scan-{n}@relay.contoso.test>", rcpt, clock.now(), sender=sender))
            expected[f"<scan-{n}@relay.contoso.test>"] = status
        await send_batch(sandbox, messages)
        clock.advance(4 * 86400 + 3600)
    assert len(sandbox.ctx.trace.records()) == 2000

    client = client_for()
    try:
        results = await client.lookup(requests)
    finally:
        await client.aclose()
    assert [r.request for r in results] == requests
    assert {r.request.message_id: r.status for r in results} == expected
    assert sum(1 for r in results if r.details) == 220  # events only where the Inbox was not the end
    junk = next(r for r in results if r.status is TraceStatus.FILTERED_AS_SPAM)
    assert [d.event for d in junk.details] == ["Receive", "Spam Diagnostics", "Deliver"]
    assert 'Name="CIP" String="203.0.113.5"' in junk.details[1].data
    assert "trace 429 TooManyRequests" not in sandbox.ctx.store.rejections()
    assert client.throttled == 0
    # Two windows of at most 10 days (one page each), then one request per recipient needing events.
    assert client.requests == 2 + 220
    assert client.budget.max_in_window(300) <= 80


async def test_a_token_without_the_permission_is_a_distinct_error(
    sandbox: Sandbox, client_for: Callable[..., MessageTraceClient]
) -> None:
    client = client_for(MAIL_ONLY)
    try:
        with pytest.raises(TracePermissionError) as refused:
            await client.lookup([TraceRequest("<x@y>", "alice@contoso.test", sandbox.ctx.clock.now())])
    finally:
        await client.aclose()
    assert refused.value.status == 403 and refused.value.code == "Forbidden"
    assert "ExchangeMessageTrace.Read.All" in str(refused.value)
    assert client.requests == 1  # no retry: only an admin can fix it


async def test_retry_after_is_honoured_when_someone_else_used_the_quota(
    sandbox: Sandbox, client_for: Callable[..., MessageTraceClient]
) -> None:
    """An admin's script used all 100 requests: the client waits as Retry-After says, then succeeds."""
    clock = sandbox.ctx.clock
    sent = clock.now()
    await send_batch(
        sandbox,
        [
            (
                "scanner@contoso.test",
                ["alice@contoso.test"],
                mail("scanner@contoso.test", "alice@contoso.test", 1),
            )
        ],
    )
    client = client_for()
    token = await admin_token(sandbox)
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(sandbox.ca_path))) as http:
        for _ in range(100):
            response = await http.get(
                f"{sandbox.graph_url}{TRACES}", headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status_code == 200
    clock.advance(90)  # the client asks for periods ending a minute ago
    try:
        [result] = await client.lookup(
            [TraceRequest("<scan-1@relay.contoso.test>", "alice@contoso.test", sent)]
        )
    finally:
        await client.aclose()
    assert result.status is TraceStatus.DELIVERED
    assert client.throttled == 1 and sandbox.ctx.store.rejections()["trace 429 TooManyRequests"] == 1
    assert clock.now() >= sent + 300  # it waited until the first of the 100 left the window


async def test_throttled_longer_than_max_wait_gives_up(
    sandbox: Sandbox, client_for: Callable[..., MessageTraceClient]
) -> None:
    client = client_for(max_wait=60)
    sandbox.ctx.tenant = dataclasses.replace(
        sandbox.ctx.tenant, limits=dataclasses.replace(sandbox.ctx.tenant.limits, trace_requests_per_window=1)
    )
    token = await admin_token(sandbox)
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(sandbox.ca_path))) as http:
        assert (
            await http.get(f"{sandbox.graph_url}{TRACES}", headers={"Authorization": f"Bearer {token}"})
        ).status_code == 200
    try:
        with pytest.raises(TraceUnavailableError, match="throttled for more than 60 s"):
            await client.lookup([TraceRequest("<x@y>", "alice@contoso.test", sandbox.ctx.clock.now())])
    finally:
        await client.aclose()


async def test_getting_status_until_microsoft_has_a_final_status(
    sandbox: Sandbox, client_for: Callable[..., MessageTraceClient]
) -> None:
    """The follower asks again until a final status: a record first says gettingStatus."""
    clock = sandbox.ctx.clock
    tenant = sandbox.ctx.tenant
    sandbox.ctx.tenant = dataclasses.replace(
        tenant, limits=dataclasses.replace(tenant.limits, trace_status_delay_seconds=900)
    )
    sent = clock.now()
    await send_batch(
        sandbox,
        [("bob@fabrikam.test", ["alice@contoso.test"], mail("bob@fabrikam.test", "alice@contoso.test", 9))],
    )
    client = client_for()
    wanted = [TraceRequest("<scan-9@relay.contoso.test>", "alice@contoso.test", sent)]
    missing = [TraceRequest("<never@relay.contoso.test>", "alice@contoso.test", sent)]
    clock.advance(120)  # the client asks for periods ending a minute ago
    try:
        [early, absent] = await client.lookup(wanted + missing)
        assert early.status is TraceStatus.GETTING_STATUS and not early.status.final and early.details == ()
        assert absent.record is None and not absent.expired
        clock.advance(780)
        [late] = await client.lookup(wanted)
    finally:
        await client.aclose()
    assert late.status is TraceStatus.FILTERED_AS_SPAM and late.status.after_acceptance_problem
    assert late.record is not None and late.record.from_ip == "203.0.113.5"
    assert [d.event for d in late.details][-1] == "Deliver"


async def test_server_errors_are_retried_and_an_injected_retry_after_is_kept(
    sandbox: Sandbox, client_for: Callable[..., MessageTraceClient]
) -> None:
    """A 503 is retried after a pause; a 429 that says Retry-After: 7 is waited for exactly so long
    (the client's own budget is full, so only the server's word makes it wait)."""
    clock = sandbox.ctx.clock
    sent = clock.now()
    await send_batch(
        sandbox,
        [
            (
                "scanner@contoso.test",
                ["alice@contoso.test"],
                mail("scanner@contoso.test", "alice@contoso.test", 5),
            )
        ],
    )
    clock.advance(120)
    client = client_for()
    await client._token()  # the token first: the faults below are for Graph requests only
    sandbox.ctx.faults.add(Fault(endpoint="graph", stage="request", reply="503"))
    sandbox.ctx.faults.add(
        Fault(endpoint="graph", stage="request", reply="429", headers=MappingProxyType({"Retry-After": "7"}))
    )
    before = clock.now()
    try:
        [result] = await client.lookup(
            [TraceRequest("<scan-5@relay.contoso.test>", "alice@contoso.test", sent)]
        )
    finally:
        await client.aclose()
    assert result.status is TraceStatus.DELIVERED
    assert (client.requests, client.throttled) == (3, 1)
    assert clock.now() - before >= 5 + 7  # the 503 pause, then Retry-After (and a token earned after it)
    assert sandbox.ctx.store.rejections() == {"graph 503 fault": 1, "graph 429 fault": 1}
