"""Tokens over months, compressed: expiry and refresh mid-run, an endpoint outage, throttling replies.
A token or DNS outage defers mail and never bounces it; it is delivered once the cause is gone."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from relay365.sandbox.faults import Fault
from relay365.sandbox.runner import Sandbox
from relay365.service.relay import Relay
from tests.conftest import make_settings, running_relay
from tests.m365.conftest import submission
from tests.m365.test_smtp_transports import send, wait_until

FAST_RETRY = {"min_backoff": 0.5, "max_backoff": 1, "poll_interval": 0.2}


async def state_of(relay: Relay, qid: str) -> Any:
    return (await relay.spool.get(qid)).recipients[0]


async def test_expired_token_is_refreshed_mid_run(tmp_path: Path, sandbox: Sandbox) -> None:
    settings = make_settings(tmp_path, transport=[submission(sandbox)], delivery=FAST_RETRY)
    store = sandbox.ctx.store
    async with running_relay(settings) as relay:
        await send(relay, "scanner@contoso.test", ["alice@contoso.test"], b"Subject: 1\r\n\r\none\r\n")
        await wait_until(lambda: len(store.list(mailbox="alice@contoso.test")) == 1)
        # Two hours pass for Microsoft: the cached token is now expired there. The relay's session and
        # token are refused (535 5.7.3), the mail waits, a fresh token is fetched, the mail goes out.
        sandbox.ctx.clock.advance(7200)
        await send(relay, "scanner@contoso.test", ["alice@contoso.test"], b"Subject: 2\r\n\r\ntwo\r\n")
        await wait_until(lambda: len(store.list(mailbox="alice@contoso.test")) == 2, 20)
        assert relay.scheduler is not None
        await relay.scheduler.drain()
        assert await relay.spool.list() == []


async def test_token_endpoint_down_defers_then_delivers(tmp_path: Path, sandbox: Sandbox) -> None:
    sandbox.ctx.faults.add(Fault("token", "request", reply="503", times=3))
    settings = make_settings(tmp_path, transport=[submission(sandbox)], delivery=FAST_RETRY)
    store = sandbox.ctx.store
    async with running_relay(settings) as relay:
        qid = await send(relay, "scanner@contoso.test", ["alice@contoso.test"], b"Subject: t\r\n\r\nx\r\n")
        await wait_until(lambda: len(store.list(mailbox="alice@contoso.test")) == 1, 30)
        assert relay.scheduler is not None
        await relay.scheduler.drain()
        with pytest.raises(Exception, match=qid):
            await relay.spool.get(qid)  # delivered and removed, never bounced
        assert store.list(folder="Internet") == []


async def test_concurrency_limit_reply_slows_down_not_bounces(tmp_path: Path, sandbox: Sandbox) -> None:
    sandbox.ctx.faults.add(
        Fault("submission", "mail", reply="432 4.3.2 Concurrent connections limit exceeded.", times=1)
    )
    settings = make_settings(tmp_path, transport=[submission(sandbox, pacing_window=1)], delivery=FAST_RETRY)
    async with running_relay(settings) as relay:
        await send(relay, "scanner@contoso.test", ["alice@contoso.test"], b"Subject: t\r\n\r\nx\r\n")
        await wait_until(lambda: len(sandbox.ctx.store.list(mailbox="alice@contoso.test")) == 1, 30)


async def test_dns_outage_defers_direct_send(tmp_path: Path, sandbox: Sandbox) -> None:
    from relay365.diagnostics.dnsserver import DnsServer
    from tests.m365.conftest import direct_send

    zone: dict[str, Any] = {"contoso.test": "SERVFAIL"}
    async with DnsServer(zone) as dns:
        transport = direct_send(sandbox, host="", nameservers=[dns.nameserver])
        settings = make_settings(tmp_path, transport=[transport], delivery=FAST_RETRY)
        async with running_relay(settings) as relay:
            qid = await send(relay, "alice@contoso.test", ["alice@contoso.test"], b"Subject: d\r\n\r\nx\r\n")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while (r := await state_of(relay, qid)).attempts < 2:
                assert loop.time() < deadline
                await asyncio.sleep(0.1)
            assert r.state.value == "deferred" and "4.4.3" in r.last_reply


async def test_direct_send_finds_the_mx_endpoint_in_dns(tmp_path: Path, sandbox: Sandbox) -> None:
    from relay365.diagnostics.dnsserver import DnsServer
    from tests.m365.conftest import direct_send

    async with DnsServer({"contoso.test": {"MX": [(0, "localhost")]}}) as dns:
        transport = direct_send(sandbox, host="", nameservers=[dns.nameserver])
        settings = make_settings(tmp_path, transport=[transport], delivery=FAST_RETRY)
        async with running_relay(settings) as relay:
            await send(relay, "alice@contoso.test", ["alice@contoso.test"], b"Subject: mx\r\n\r\nx\r\n")
            await wait_until(lambda: len(sandbox.ctx.store.list(mailbox="alice@contoso.test")) == 1)


async def test_a_refused_token_is_never_handed_out_again(tmp_path: Path, sandbox: Sandbox) -> None:
    """After the upstream refused a token (``invalidate``), the next one comes from the token endpoint:
    msal caches app tokens until they expire, and would otherwise hand the refused one back."""
    from relay365.oauth import SMTP_SCOPE, token_source

    settings = make_settings(tmp_path, transport=[submission(sandbox)])
    source = token_source(settings.transport("submission"), scope=SMTP_SCOPE)
    try:
        first = await source.token()
        assert await source.token() == first  # valid: reused, not fetched again
        source.invalidate()
        second = await source.token()
        assert second != first
        assert await source.token() == second
    finally:
        source.close()
