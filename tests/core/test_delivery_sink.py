"""Delivery against Postfix's ``smtp-sink`` and its fault injection: -r (4xx), -f (5xx), -q (hang up
without a reply), -Q (421 and hang up) at the greeting, MAIL, RCPT, DATA and "."."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from relay365.service.relay import Relay
from relay365.spool.model import RcptState
from tests.support import (
    Clock,
    SmtpSink,
    make_settings,
    running_relay,
    send_message,
    smarthost,
    smtp_sink,
    wait_gone,
    wait_state,
    wait_until,
)

BODY = b"Subject: sink test\r\n\r\nscan attached\r\n"
RCPT = "alice@contoso.com"


def settings_for(tmp_path: Path, port: int) -> object:
    return make_settings(
        tmp_path,
        listener=[{"name": "lan", "port": 0, "tls": "none"}],
        transport=[smarthost(port, timeout=5)],
        delivery={"min_backoff": 60, "max_backoff": 600, "poll_interval": 0.2},
    )


async def sent(relay: Relay, **kwargs: object) -> str:
    return await asyncio.to_thread(send_message, relay.ports["lan"], body=BODY, **kwargs)  # type: ignore[arg-type]


async def dumped(sink: SmtpSink, count: int, timeout: float = 10.0) -> list[bytes]:
    async def check() -> bool:
        return sum(d.endswith(b"scan attached\n\n") for d in sink.dumps()) >= count

    await wait_until(check, timeout, f"{count} message(s) in smtp-sink")
    return sink.dumps()


async def test_delivered_to_smtp_sink(tmp_path: Path) -> None:
    with smtp_sink() as sink:
        async with running_relay(settings_for(tmp_path, sink.port), clock=Clock()) as relay:  # type: ignore[arg-type]
            qid = await sent(relay, rcpts=(RCPT, "bob@contoso.com"))
            [dump] = await dumped(sink, 1)
            await wait_gone(relay.spool, qid)
    assert b"X-Mail-Args: <scanner@contoso.com>\n" in dump
    assert b"X-Rcpt-Args: <alice@contoso.com>\nX-Rcpt-Args: <bob@contoso.com>\n" in dump
    assert f"id {qid}".encode() in dump


@pytest.mark.parametrize(
    ("options", "reply"),
    [
        (("-r", "CONNECT"), "451 4.4.1"),
        (("-f", "CONNECT"), "451 4.4.1"),  # a 5xx greeting defers (Postfix smtp_skip_5xx_greeting)
        (("-r", "MAIL"), "450 4.3.0"),
        (("-r", "RCPT"), "450 4.3.0"),
        (("-r", "DATA"), "450 4.3.0"),
        (("-r", "."), "450 4.3.0"),
        (("-Q", "RCPT"), "421"),
        (("-q", "MAIL"), "451 4.4.2"),  # hang up without a reply: a lost connection, transient
        (("-q", "."), "451 4.4.2"),
    ],
)
async def test_fault_defers_then_retry_delivers(
    tmp_path: Path, options: tuple[str, str], reply: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    with smtp_sink(*options) as faulty:
        port = faulty.port
        async with running_relay(settings_for(tmp_path, port), clock=clock) as relay:  # type: ignore[arg-type]
            with caplog.at_level(logging.WARNING, logger="relay365.transports.smtp_client"):
                qid = await sent(relay)
                entry = await wait_state(relay.spool, qid, RCPT, RcptState.DEFERRED)
            [r] = entry.recipients
            assert r.last_reply.startswith(reply), r.last_reply
            assert r.attempts == 1 and r.next_attempt == clock.now + 60
            if options == ("-q", "."):
                assert "a retry can duplicate it" in caplog.text
            if options == ("-f", "CONNECT"):
                assert "greeted with 500 5.3.0" in r.last_reply
            faulty.stop()
            with smtp_sink(port=port) as healthy:
                clock.advance(60)
                await dumped(healthy, 1)
                await wait_gone(relay.spool, qid)


@pytest.mark.parametrize("stage", ["RCPT", "."])
async def test_5xx_bounces_and_the_refused_dsn_is_dropped(
    tmp_path: Path, stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """smtp-sink refuses everything with 500 5.3.0: the message bounces, its DSN (from <>) is refused
    too and is dropped with a log line: exactly one DSN, no bounce of the bounce."""
    dsns: set[str] = set()
    with smtp_sink("-f", stage) as sink:
        async with running_relay(settings_for(tmp_path, sink.port), clock=Clock()) as relay:  # type: ignore[arg-type]
            with caplog.at_level(logging.INFO, logger="relay365.delivery.scheduler"):
                qid = await sent(relay)

                async def done() -> bool:
                    entries = await relay.spool.list()
                    dsns.update(e.queue_id for e in entries if e.envelope.is_dsn)
                    return entries == [] and "not bouncing a message from <>" in caplog.text

                await wait_until(done, 15, "the bounce and the dropped DSN")
    assert len(dsns) <= 1
    assert f"{qid}: bounce to <scanner@contoso.com> for 1 recipient(s)" in caplog.text
    assert "outcome=permanent reply='500 5.3.0 Error: command failed'" in caplog.text
    assert caplog.text.count("not bouncing a message from <>") == 1
    assert caplog.text.count("bounce to <") == 1


async def test_stale_reused_session_reconnects_without_deferring(tmp_path: Path) -> None:
    """smtp-sink drops an idle session after 1 s (-t 1); the pooled session is stale by the next
    message, and the relay reconnects at once instead of deferring the message."""
    with smtp_sink("-t", "1") as sink:
        async with running_relay(settings_for(tmp_path, sink.port), clock=Clock()) as relay:  # type: ignore[arg-type]
            first = await sent(relay)
            await dumped(sink, 1)
            await wait_gone(relay.spool, first)
            await asyncio.sleep(2.0)  # longer than the upstream's idle timeout, shorter than our reuse
            second = await sent(relay)
            await dumped(sink, 2)
            await wait_gone(relay.spool, second)
