"""The null sender ``MAIL FROM:<>`` (issue 8, item 5; RFC 5321 4.5.5).

Devices send notifications and DSNs from ``<>``. It is accepted subject to device policy
(``allowed_senders`` lists ``"<>"``; ``"*"`` includes it), rewritten where ``rewrite_sender`` applies,
routed only to transports that can carry it (smart host, Direct Send, connector: not SMTP AUTH
submission or Graph, which send as a mailbox), and it never causes a bounce.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay365.delivery.router import NoRoute, Router
from relay365.service.relay import Relay
from relay365.settings import RouteSettings
from tests.support import (
    RawSMTP,
    RecordingUpstream,
    closed_port,
    make_settings,
    running_relay,
    smarthost,
    wait_gone,
)

MAILBOX = "scanner@contoso.com"


@pytest.fixture
async def relay(
    tmp_path: Path, upstream: RecordingUpstream, request: pytest.FixtureRequest
) -> AsyncIterator[Relay]:
    marker = request.node.get_closest_marker("relay")
    extra: dict[str, Any] = dict(marker.kwargs) if marker else {}
    extra.setdefault("transport", [smarthost(upstream.port)])
    async with running_relay(make_settings(tmp_path, **extra)) as r:
        yield r


async def session(relay: Relay) -> RawSMTP:
    c = await RawSMTP.connect(relay.ports["lan"])
    await c.reply()
    assert (await c.cmd("EHLO printer.lan")).startswith("250")
    return c


async def send_null(relay: Relay, body: bytes = b"Subject: toner low\r\n\r\nx\r\n") -> str:
    c = await session(relay)
    reply = await c.cmd("MAIL FROM:<>")
    assert reply.startswith("250 2.1.0"), reply
    assert (await c.cmd("RCPT TO:<bob@contoso.com>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    reply = await c.cmd(body + b".")
    assert reply.startswith("250 2.0.0"), reply
    await c.close()
    return reply.split()[-1]


async def test_null_sender_is_accepted_and_relayed_as_null(
    relay: Relay, upstream: RecordingUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The default device (allowed_senders = ["*"]) may use <>; it goes upstream as <>."""
    caplog.set_level(logging.INFO, logger="relay365")
    qid = await send_null(relay)
    [msg] = await upstream.wait_for(1)
    assert msg.mail_from in ("", "<>") and msg.rcpt_tos == ["bob@contoso.com"]  # aiosmtpd says "<>"
    assert f"queued {qid} from=<> nrcpt=1" in caplog.text
    await wait_gone(relay.spool, qid)


@pytest.mark.relay(device=[{"name": "app", "ip_allow": ["127.0.0.1/32"], "allowed_senders": [MAILBOX]}])
async def test_null_sender_needs_the_device_policy(relay: Relay) -> None:
    c = await session(relay)
    reply = await c.cmd("MAIL FROM:<>")
    assert reply.startswith("550 5.7.1 Device app may not send as <>"), reply
    assert (await c.cmd(f"MAIL FROM:<{MAILBOX}>")).startswith("250")
    await c.close()


@pytest.mark.relay(device=[{"name": "app", "ip_allow": ["127.0.0.1/32"], "allowed_senders": [MAILBOX, "<>"]}])
async def test_null_sender_allowed_by_listing_it(relay: Relay, upstream: RecordingUpstream) -> None:
    await send_null(relay)
    [msg] = await upstream.wait_for(1)
    assert msg.mail_from in ("", "<>")


@pytest.mark.relay(device=[{"name": "mfp", "ip_allow": ["127.0.0.1/32"], "rewrite_sender": MAILBOX}])
async def test_null_sender_is_rewritten_and_never_bounced(
    relay: Relay, upstream: RecordingUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Rewritten to the mailbox (envelope and From), yet still a notification: a permanent failure
    bounces nothing, not even to the mailbox that now stands in the envelope."""
    caplog.set_level(logging.INFO, logger="relay365")
    upstream.plan.replies["rcpt:nobody@contoso.com"] = ["550 5.1.1 User unknown"]
    c = await session(relay)
    assert (await c.cmd("MAIL FROM:<>")).startswith("250")
    assert (await c.cmd("RCPT TO:<bob@contoso.com>")).startswith("250")
    assert (await c.cmd("RCPT TO:<nobody@contoso.com>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    reply = await c.cmd(b"From: MAILER-DAEMON@mfp.lan\r\nSubject: status\r\n\r\nx\r\n.")
    assert reply.startswith("250 2.0.0")
    await c.close()
    qid = reply.split()[-1]
    [msg] = await upstream.wait_for(1)
    assert msg.mail_from == MAILBOX
    parsed = email.message_from_bytes(msg.content, policy=email.policy.SMTP)
    assert [str(f) for f in parsed.get_all("From")] == [MAILBOX]
    await wait_gone(relay.spool, qid)
    assert f"queued {qid} from=<{MAILBOX}>" in caplog.text
    assert f"{qid}: not bouncing a message from <> (1 failed recipient(s))" in caplog.text
    assert relay.scheduler is not None
    await relay.scheduler.drain()
    await asyncio.sleep(0.5)
    assert len(upstream.messages) == 1  # no DSN was queued or sent
    assert await relay.spool.list() == []


async def test_null_sender_failure_is_never_bounced(
    relay: Relay, upstream: RecordingUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.plan.replies["rcpt"] = ["550 5.1.1 User unknown"]
    qid = await send_null(relay)
    await wait_gone(relay.spool, qid)
    assert relay.scheduler is not None
    await relay.scheduler.drain()
    await asyncio.sleep(0.5)
    assert upstream.messages == [] and await relay.spool.list() == []
    assert f"{qid}: not bouncing a message from <> (1 failed recipient(s))" in caplog.text


def submission(port: int) -> dict[str, Any]:
    """An SMTP AUTH submission transport (it sends as its mailbox: it cannot carry <>)."""
    return {
        "name": "m365",
        "type": "submission",
        "host": "127.0.0.1",
        "port": port,
        "mailbox": MAILBOX,
        "auth": "basic",
        "username": MAILBOX,
        "password_env": "RELAY365_TEST_SUBMISSION_PW",
    }


@pytest.fixture
def submission_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY365_TEST_SUBMISSION_PW", "not-used")


@pytest.mark.usefixtures("submission_secret")
async def test_null_sender_is_refused_at_rcpt_without_a_route_that_carries_it(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, transport=[submission(closed_port())])
    async with running_relay(settings) as relay:
        c = await session(relay)
        assert (await c.cmd("MAIL FROM:<>")).startswith("250")
        reply = await c.cmd("RCPT TO:<bob@contoso.com>")
        assert reply.startswith("550 5.7.1 ") and "null sender" in reply, reply
        await c.close()
        # Ordinary mail takes the same route.
        c = await session(relay)
        assert (await c.cmd(f"MAIL FROM:<{MAILBOX}>")).startswith("250")
        assert (await c.cmd("RCPT TO:<bob@contoso.com>")).startswith("250")
        await c.close()


@pytest.mark.usefixtures("submission_secret")
async def test_null_sender_takes_the_route_that_can_carry_it(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    settings = make_settings(
        tmp_path,
        transport=[submission(closed_port()), smarthost(upstream.port)],
        route=[
            {"name": "m365", "transport": "m365", "recipient_domains": ["contoso.com"], "fallbacks": ["up"]},
            {"name": "rest", "transport": "up"},
        ],
    )
    async with running_relay(settings) as relay:
        qid = await send_null(relay)
        [msg] = await upstream.wait_for(1)
        assert msg.mail_from in ("", "<>")
        await wait_gone(relay.spool, qid)


def test_router_skips_transports_that_cannot_carry_the_null_sender() -> None:
    routes = [
        RouteSettings(name="graph", transport="graph", fallbacks=("sub", "mx")),
        RouteSettings(name="any", transport="mx"),
    ]
    router = Router(routes, null_sender=frozenset({"mx"}))
    choice = router.choose(rcpt="bob@contoso.com", sender="", device="d", size=10)
    assert choice.transport == "mx" and choice.fallbacks == ()
    ordinary = router.choose(rcpt="bob@contoso.com", sender="a@contoso.com", device="d", size=10)
    assert ordinary.transport == "graph" and ordinary.fallbacks == ("sub", "mx")
    only_graph = Router(routes[:1], null_sender=frozenset({"mx"}))
    with pytest.raises(NoRoute, match="null sender"):
        only_graph.choose(rcpt="bob@contoso.com", sender="", device="d", size=10)
