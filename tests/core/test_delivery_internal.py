"""No silent retry loops: an unexpected exception inside a delivery attempt (a transport raising
something outside the ``DeliveryError`` family, the DSN builder failing, an unreadable message file)
is a recorded attempt with a readable reply, backs off like a 4xx, counts toward the queue lifetime
and ends in exactly one DSN. Real relay, real upstream, a clock the test moves.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from relay365.spool.model import RcptState
from relay365.transports.base import OutboundMessage, RecipientResult, Transport
from tests.support import (
    Clock,
    RecordingUpstream,
    run_cli,
    running_relay,
    wait_gone,
    wait_state,
    wait_until,
    write_config,
)
from tests.support.delivery import NO_TLS, parse_dsn, send, settings_for, settle

RCPT = "alice@contoso.com"
LIFETIME = {"queue_lifetime": 3600, "min_backoff": 60, "max_backoff": 600}


class BuggyTransport:
    """The fault being injected: a transport whose own code raises for the devices' mail (a bug, not
    a ``DeliveryError``). The relay's DSNs (from <>) go through the real transport underneath."""

    def __init__(self, inner: Transport, error: Exception) -> None:
        self.name = inner.name
        self.inner = inner
        self.error = error
        self.calls = 0

    async def deliver(self, message: OutboundMessage) -> list[RecipientResult]:
        if message.mail_from:
            self.calls += 1
            raise self.error
        return await self.inner.deliver(message)

    async def close(self) -> None:
        await self.inner.close()


async def test_transport_exception_is_an_attempt_with_backoff_lifetime_and_one_dsn(
    tmp_path: Path, upstream: RecordingUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    config = write_config(tmp_path, listener=NO_TLS)  # same spool, for `relay365 queue show`
    async with running_relay(settings_for(tmp_path, upstream.port, delivery=LIFETIME), clock=clock) as relay:
        buggy = BuggyTransport(relay.transports["up"], ValueError("unbalanced quote in 'To'"))
        relay.transports["up"] = buggy
        with caplog.at_level(logging.ERROR, logger="relay365.delivery.scheduler"):
            qid = await send(relay)
            entry = await wait_state(relay.spool, qid, RCPT, RcptState.DEFERRED)
        [r] = entry.recipients
        reply = "451 4.3.0 internal error: ValueError: unbalanced quote in 'To'"
        assert (r.attempts, r.last_reply, r.next_attempt) == (1, reply, clock.now + 60)
        assert "Traceback" in caplog.text and "ValueError" in caplog.text  # the bug is in the log

        shown = await asyncio.to_thread(run_cli, "queue", "show", qid, "-c", str(config))
        assert shown.returncode == 0, shown.stderr
        assert reply in shown.stdout and "deferred" in shown.stdout

        clock.advance(59)  # normal back-off: not retried before the minimum
        await asyncio.sleep(0.5)
        assert buggy.calls == 1
        clock.advance(1)
        await wait_until(lambda: _attempts(relay, qid, 2), what="second attempt")
        r = (await relay.spool.get(qid)).recipients[0]
        assert r.next_attempt == clock.now + 120 and buggy.calls == 2  # doubled, like any 4xx

        clock.advance(3600)  # past the queue lifetime: the next failing attempt bounces
        [dsn] = await upstream.wait_for(1)
        _, [block], headers = parse_dsn(dsn)
        assert block["Final-Recipient"] == f"rfc822; {RCPT}"
        assert block["Status"] == "4.4.7"
        assert block["Diagnostic-Code"] == f"smtp; {reply}"
        assert b"Subject: quarterly report" in headers
        await wait_gone(relay.spool, qid)
        await settle(relay, clock, passes=4)
        assert len(upstream.messages) == 1 and buggy.calls == 3  # one DSN, no more attempts
        assert await relay.spool.list() == []


async def _attempts(relay: object, qid: str, n: int) -> bool:
    return (await relay.spool.get(qid)).recipients[0].attempts >= n  # type: ignore[attr-defined]


async def test_dsn_builder_failure_still_bounces_once(
    tmp_path: Path, upstream: RecordingUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reply-code catalogue (the DSN's hint line) raises: the DSN is built without the hints,
    the failed recipient is bounced exactly once and the message leaves the queue."""

    def broken_catalogue(reply: str) -> str | None:
        raise KeyError("catalogue table damaged")

    monkeypatch.setattr("relay365.service.relay.explain_reply", broken_catalogue)
    clock = Clock()
    unknown = "550 5.1.1 <bob@contoso.com>: Recipient address rejected: User unknown"
    upstream.plan.replies["rcpt:bob@contoso.com"] = [unknown]
    async with running_relay(settings_for(tmp_path, upstream.port), clock=clock) as relay:
        qid = await send(relay, rcpts=(RCPT, "bob@contoso.com"))
        original, dsn = await upstream.wait_for(2)
        assert original.rcpt_tos == [RCPT]
        _, [block], headers = parse_dsn(dsn)
        assert block["Final-Recipient"] == "rfc822; bob@contoso.com"
        assert block["Status"] == "5.1.1" and block["Diagnostic-Code"] == f"smtp; {unknown}"
        assert b"Message-ID: <scan-42@contoso.com>" in headers
        await wait_gone(relay.spool, qid)
        await settle(relay, clock, passes=3)
        assert len(upstream.messages) == 2  # alice once, one DSN; nothing repeated


async def test_unreadable_message_file_defers_readably_then_one_dsn(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    """The message file vanished from the spool (a disk error, an admin's rm): each attempt is
    recorded with the reason, the upstream is not held back for it, and at the end of the queue
    lifetime one DSN (without the original headers, which are gone) tells the sender."""
    clock = Clock()
    upstream.plan.replies["mail"] = ["451 4.3.0 try again later"]
    async with running_relay(settings_for(tmp_path, upstream.port, delivery=LIFETIME), clock=clock) as relay:
        qid = await send(relay)
        entry = await wait_state(relay.spool, qid, RCPT, RcptState.DEFERRED)
        relay.spool.body_file(entry).unlink()  # type: ignore[attr-defined]
        clock.advance(60)
        await wait_until(lambda: _attempts(relay, qid, 2), what="second attempt")
        [r] = (await relay.spool.get(qid)).recipients
        assert r.state is RcptState.DEFERRED and r.next_attempt == clock.now + 120
        assert r.last_reply.startswith("451 4.3.0 "), r.last_reply
        assert "FileNotFoundError" in r.last_reply and qid in r.last_reply
        assert relay.scheduler is not None and relay.scheduler.suspended() == {}
        # Other mail to the same upstream still flows at once.
        other = await send(relay, body=b"Subject: other\r\n\r\nfine\r\n")
        [msg] = await upstream.wait_for(1)
        assert msg.content.endswith(b"fine\r\n")
        await wait_gone(relay.spool, other)

        clock.advance(3600)
        _, dsn = await upstream.wait_for(2)
        _, [block], headers = parse_dsn(dsn)
        assert block["Status"] == "4.4.7" and "FileNotFoundError" in block["Diagnostic-Code"]
        assert headers == b""
        await wait_gone(relay.spool, qid)
        await settle(relay, clock, passes=3)
        assert len(upstream.messages) == 2
