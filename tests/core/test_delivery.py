"""Scheduler + smart host transport against a recording upstream, with a clock the test moves:
delivered, deferred with back-off, bounced with one RFC 3464 DSN, partial acceptance, queue lifetime,
no bounce of a bounce, a stalled upstream, session reuse.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from relay365.service.relay import Relay
from relay365.spool.model import Envelope, RcptState
from tests.support import (
    Clock,
    Received,
    RecordingUpstream,
    body_files,
    body_of,
    closed_port,
    running_relay,
    smarthost,
    wait_gone,
    wait_state,
    wait_until,
)
from tests.support.delivery import ORIGINAL, parse_dsn, parts_of, send, settings_for, settle


async def test_delivered_and_removed(tmp_path: Path, upstream: RecordingUpstream) -> None:
    async with running_relay(settings_for(tmp_path, upstream.port), clock=Clock()) as relay:
        qid = await send(relay)
        [msg] = await upstream.wait_for(1)
        assert msg.content.endswith(ORIGINAL)
        await wait_gone(relay.spool, qid)
        assert body_files(relay.spool.messages_dir) == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("stage", "reply"),
    [
        ("mail", "451 4.3.0 Try again later"),
        ("rcpt", "450 4.2.1 Mailbox busy, try again"),
        ("data", "451 4.7.500 Server busy. Please try again later"),
        ("data", "421 4.3.2 Service not available, closing channel"),
    ],
)
async def test_4xx_defers_with_backoff_then_delivers(
    tmp_path: Path, upstream: RecordingUpstream, stage: str, reply: str
) -> None:
    clock = Clock()
    upstream.plan.replies[stage] = [reply, reply]
    settings = settings_for(tmp_path, upstream.port, delivery={"min_backoff": 60, "max_backoff": 100})
    async with running_relay(settings, clock=clock) as relay:
        qid = await send(relay)
        rcpt = "alice@contoso.com"
        entry = await wait_state(relay.spool, qid, rcpt, RcptState.DEFERRED)
        [r] = entry.recipients
        assert r.attempts == 1 and r.last_reply.startswith(reply[:9])
        assert r.next_attempt == clock.now + 60  # first retry after the minimum
        assert upstream.messages == []

        clock.advance(59)  # not due yet: nothing happens
        await asyncio.sleep(0.5)
        assert (await relay.spool.get(qid)).recipients[0].attempts == 1

        clock.advance(1)
        await wait_until(
            lambda: _attempts(relay, qid, 2), what="second attempt"
        )  # doubled: 120 s, bounded by the maximum of 100 s
        r = (await relay.spool.get(qid)).recipients[0]
        assert r.state is RcptState.DEFERRED and r.next_attempt == clock.now + 100
        assert 60 <= r.next_attempt - clock.now <= 100

        clock.advance(100)
        [msg] = await upstream.wait_for(1)
        assert msg.rcpt_tos == [rcpt] and msg.content.endswith(ORIGINAL)
        await wait_gone(relay.spool, qid)


async def _attempts(relay: Relay, qid: str, n: int) -> bool:
    return (await relay.spool.get(qid)).recipients[0].attempts >= n


async def test_5xx_bounces_with_one_rfc3464_dsn(tmp_path: Path, upstream: RecordingUpstream) -> None:
    clock = Clock()
    unknown = "550 5.1.1 <bob@contoso.com>: Recipient address rejected: User unknown"
    upstream.plan.replies["rcpt:bob@contoso.com"] = [unknown]
    async with running_relay(settings_for(tmp_path, upstream.port), clock=clock) as relay:
        qid = await send(relay, rcpts=("alice@contoso.com", "bob@contoso.com"))
        original, dsn = await upstream.wait_for(2)
        assert original.rcpt_tos == ["alice@contoso.com"] and original.mail_from == "scanner@contoso.com"
        assert dsn.rcpt_tos == ["scanner@contoso.com"]
        msg, [block], headers = parse_dsn(dsn)
        assert msg["To"] == "<scanner@contoso.com>"
        assert block["Final-Recipient"] == "rfc822; bob@contoso.com"
        assert block["Action"] == "failed"
        assert block["Status"] == "5.1.1"
        assert block["Diagnostic-Code"] == f"smtp; {unknown}"
        assert b"Subject: quarterly report\r\n" in headers
        assert b"Message-ID: <scan-42@contoso.com>\r\n" in headers
        assert f"id {qid}".encode() in headers  # our Received header is part of the original's
        assert b"See attachment." not in headers  # headers only
        text = parts_of(msg)[0].get_payload()
        assert isinstance(text, str)
        assert "<bob@contoso.com>: 550 5.1.1" in text
        await wait_gone(relay.spool, qid)
        await settle(relay, clock)
        assert len(upstream.messages) == 2  # exactly one DSN, however many passes run
        assert await relay.spool.list() == []


async def test_5xx_for_whole_message_bounces_every_recipient(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    upstream.plan.replies["data"] = ["554 5.6.0 Message content rejected"]
    async with running_relay(settings_for(tmp_path, upstream.port), clock=Clock()) as relay:
        await send(relay, rcpts=("alice@contoso.com", "bob@contoso.com"))
        [dsn] = await upstream.wait_for(1)
        _, blocks, _ = parse_dsn(dsn)
        assert [b["Final-Recipient"] for b in blocks] == [
            "rfc822; alice@contoso.com",
            "rfc822; bob@contoso.com",
        ]
        assert {b["Status"] for b in blocks} == {"5.6.0"}


async def test_partial_acceptance_retries_only_refused(tmp_path: Path, upstream: RecordingUpstream) -> None:
    clock = Clock()
    upstream.plan.replies["rcpt:bob@contoso.com"] = ["450 4.2.0 <bob@contoso.com>: greylisted"]
    async with running_relay(settings_for(tmp_path, upstream.port), clock=clock) as relay:
        qid = await send(relay, rcpts=("alice@contoso.com", "bob@contoso.com"))
        [first] = await upstream.wait_for(1)
        assert first.rcpt_tos == ["alice@contoso.com"]
        entry = await wait_state(relay.spool, qid, "bob@contoso.com", RcptState.DEFERRED)
        states = {r.rcpt: r.state for r in entry.recipients}
        assert states == {"alice@contoso.com": RcptState.DELIVERED, "bob@contoso.com": RcptState.DEFERRED}
        clock.advance(61)
        _, second = await upstream.wait_for(2)
        assert second.rcpt_tos == ["bob@contoso.com"]  # alice is not sent twice
        await wait_gone(relay.spool, qid)
        await settle(relay, clock, passes=2)
        assert len(upstream.messages) == 2


async def test_queue_lifetime_gives_exactly_one_dsn(tmp_path: Path, upstream: RecordingUpstream) -> None:
    clock = Clock()
    settings = settings_for(
        tmp_path,
        upstream.port,
        delivery={"queue_lifetime": 3600, "min_backoff": 60, "max_backoff": 600},
        transport=[smarthost(upstream.port), {**smarthost(closed_port()), "name": "down"}],
        route=[
            {"name": "ext", "transport": "down", "recipient_domains": ["fabrikam.com"]},
            {"name": "default", "transport": "up"},
        ],
    )
    async with running_relay(settings, clock=clock) as relay:
        qid = await send(relay, rcpts=("carol@fabrikam.com",))
        await wait_state(relay.spool, qid, "carol@fabrikam.com", RcptState.DEFERRED)
        assert upstream.messages == []
        clock.advance(3600)  # past the queue lifetime: the next (failing) attempt bounces
        [dsn] = await upstream.wait_for(1)
        _, [block], _ = parse_dsn(dsn)
        assert block["Final-Recipient"] == "rfc822; carol@fabrikam.com"
        assert block["Action"] == "failed"
        assert block["Status"] == "4.4.7"  # RFC 3463: delivery time expired
        assert block["Diagnostic-Code"].startswith("smtp; 451 4.4.1 down (127.0.0.1:")
        await wait_gone(relay.spool, qid)
        await settle(relay, clock, passes=5)
        assert len(upstream.messages) == 1


async def test_no_bounce_for_a_bounce(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A DSN that cannot be delivered within the lifetime is dropped with a log line, not bounced."""
    clock = Clock()
    settings = settings_for(
        tmp_path, closed_port(), delivery={"queue_lifetime": 3600, "min_backoff": 60, "max_backoff": 600}
    )
    dsn_ids: set[str] = set()
    async with running_relay(settings, clock=clock) as relay:
        qid = await send(relay, mail_from="app@fabrikam.com", rcpts=("carol@fabrikam.com",))
        await wait_state(relay.spool, qid, "carol@fabrikam.com", RcptState.DEFERRED)
        with caplog.at_level(logging.INFO, logger="relay365.delivery.scheduler"):
            for _ in range(6):
                clock.advance(3600)
                await asyncio.sleep(0.4)
                await relay.scheduler.drain()  # type: ignore[union-attr]
                dsn_ids |= {e.queue_id for e in await relay.spool.list() if e.envelope.is_dsn}
            await wait_until(lambda: _empty(relay), what="empty queue")
        assert len(dsn_ids) == 1  # one DSN for the message; none for the DSN itself
        [dsn_id] = dsn_ids
        assert f"{dsn_id}: not bouncing a message from <>" in caplog.text
        assert f"{qid}: bounce to <app@fabrikam.com>" in caplog.text


async def _empty(relay: Relay) -> bool:
    return await relay.spool.list() == []


async def test_refused_dsn_is_dropped(
    tmp_path: Path, upstream: RecordingUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.plan.replies["rcpt"] = ["550 5.1.1 <gone@contoso.com>: User unknown"]
    async with running_relay(settings_for(tmp_path, upstream.port), clock=Clock()) as relay:
        env = Envelope(mail_from="", rcpt_tos=("gone@contoso.com",), device="relay365", is_dsn=True)
        with caplog.at_level(logging.WARNING, logger="relay365.delivery.scheduler"):
            qid = await relay.spool.enqueue(env, b"Subject: Undelivered Mail\r\n\r\nx\r\n")
            await wait_gone(relay.spool, qid)
            await relay.scheduler.drain()  # type: ignore[union-attr]
        assert await relay.spool.list() == []
        assert upstream.messages == []
        assert f"{qid}: not bouncing a message from <> (1 failed recipient(s))" in caplog.text


async def test_upstream_stall_after_dot_defers(
    tmp_path: Path, upstream: RecordingUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    upstream.plan.stall_after_data = 2.0
    transport = [smarthost(upstream.port, timeout=0.5)]
    async with running_relay(
        settings_for(tmp_path, upstream.port, transport=transport), clock=clock
    ) as relay:
        with caplog.at_level(logging.WARNING, logger="relay365.transports.smtp_client"):
            qid = await send(relay)
            entry = await wait_state(relay.spool, qid, "alice@contoso.com", RcptState.DEFERRED)
        assert "Timeout" in entry.recipients[0].last_reply
        assert entry.recipients[0].last_reply.startswith("451 4.4.2")  # RFC 3463: bad connection
        assert "lost after DATA began; the upstream may have it already" in caplog.text
        # The upstream drops its stalled transaction when we hang up; the retry delivers it.
        upstream.plan.stall_after_data = 0.0
        clock.advance(60)
        [msg] = await upstream.wait_for(1)
        assert msg.content.endswith(ORIGINAL)
        await wait_gone(relay.spool, qid)


async def test_session_reused_for_several_messages(tmp_path: Path, upstream: RecordingUpstream) -> None:
    transport = [smarthost(upstream.port, max_sessions=1)]
    async with running_relay(settings_for(tmp_path, upstream.port, transport=transport)) as relay:
        for i in range(5):
            await send(relay, body=f"Subject: m{i}\r\n\r\nbody\r\n".encode())
        await upstream.wait_for(5)
        # and one more after the burst, on the same idle session
        await send(relay)
        await upstream.wait_for(6)
    assert upstream.connections == 1


async def test_dsn_is_durable_across_restart(tmp_path: Path) -> None:
    """The DSN is queued in the same transaction that bounces the message: after a restart it is
    still there (and the original is gone), whole and addressed from <> to the sender."""
    clock = Clock()
    settings = settings_for(
        tmp_path, closed_port(), delivery={"queue_lifetime": 3600, "min_backoff": 60, "max_backoff": 600}
    )
    async with running_relay(settings, clock=clock) as relay:
        qid = await send(relay, rcpts=("carol@fabrikam.com",))
        await wait_state(relay.spool, qid, "carol@fabrikam.com", RcptState.DEFERRED)
        clock.advance(3600)
        await wait_gone(relay.spool, qid)
    async with running_relay(settings, clock=clock) as relay:
        [dsn] = await relay.spool.list()
        assert dsn.envelope.is_dsn and dsn.envelope.mail_from == ""
        assert dsn.envelope.rcpt_tos == ("scanner@contoso.com",)
        body = await body_of(relay.spool, dsn)
        assert dsn.size == len(body)
        received = Received(mail_from="", rcpt_tos=["scanner@contoso.com"], content=body, peer="", tls=False)
        _, [block], headers = parse_dsn(received)
        assert block["Status"] == "4.4.7" and block["Final-Recipient"] == "rfc822; carol@fabrikam.com"
        assert b"Subject: quarterly report" in headers


async def test_admin_retry_delivers_deferred_now(tmp_path: Path, upstream: RecordingUpstream) -> None:
    clock = Clock()
    upstream.plan.replies["mail"] = ["452 4.3.1 Insufficient system storage"]
    async with running_relay(settings_for(tmp_path, upstream.port), clock=clock) as relay:
        qid = await send(relay)
        entry = await wait_state(relay.spool, qid, "alice@contoso.com", RcptState.DEFERRED)
        assert entry.recipients[0].next_attempt == clock.now + 60
        await relay.spool.retry(qid, clock.now)  # what `relay365 queue retry` does; the clock stands still
        [msg] = await upstream.wait_for(1)
        assert msg.content.endswith(ORIGINAL)
        await wait_gone(relay.spool, qid)
