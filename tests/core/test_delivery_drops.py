"""A connection lost after the session was up (Postfix's ``smtp-sink -q .`` hangs up at the end of
DATA) defers that one message; the upstream is held back only after several consecutive failures,
and any successful delivery resets the count. (An upstream that cannot be reached at all is held at
once: tests/core/test_delivery_suspend.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay365.delivery.holds import DROPS_BEFORE_HOLD
from relay365.service.relay import Relay
from relay365.spool.model import RcptState
from tests.core.test_delivery_sink import settings_for
from tests.support import (
    Clock,
    SmtpSink,
    running_relay,
    send_message,
    smtp_sink,
    wait_gone,
    wait_state,
    wait_until,
)

RCPT = "alice@contoso.com"


async def sent(relay: Relay, n: int) -> str:
    body = f"Subject: scan {n}\r\nMessage-ID: <scan-{n}@contoso.com>\r\n\r\npage {n}\r\n".encode()
    return await asyncio.to_thread(send_message, relay.ports["lan"], body=body)


async def dropped(relay: Relay, n: int) -> str:
    """Send message ``n``; the upstream hangs up after DATA: wait until it is deferred."""
    qid = await sent(relay, n)
    entry = await wait_state(relay.spool, qid, RCPT, RcptState.DEFERRED)
    [r] = entry.recipients
    # RFC 3463 X.4.2 "bad connection": established, then lost before the transaction completed.
    assert r.attempts == 1 and r.last_reply.startswith("451 4.4.2 up (127.0.0.1:"), r.last_reply
    assert "SMTPServerDisconnected" in r.last_reply
    return qid


async def delivered(relay: Relay, sink: SmtpSink, n: int) -> None:
    qid = await sent(relay, n)

    async def arrived() -> bool:
        return any(f"page {n}\n".encode() in d for d in sink.dumps())

    await wait_until(arrived, 10, f"message {n} at smtp-sink")
    await wait_gone(relay.spool, qid)


def held(relay: Relay) -> bool:
    assert relay.scheduler is not None
    return "up" in relay.scheduler.suspended()


async def test_one_drop_defers_only_that_message(tmp_path: Path) -> None:
    clock = Clock()  # stands still: a hold of the upstream would keep the next message waiting
    with smtp_sink("-q", ".") as dropping:
        port = dropping.port
        async with running_relay(settings_for(tmp_path, port), clock=clock) as relay:  # type: ignore[arg-type]
            first = await dropped(relay, 1)
            assert not held(relay)
            assert (await relay.spool.get(first)).recipients[0].next_attempt == clock.now + 60
            dropping.stop()
            with smtp_sink(port=port) as healthy:
                await delivered(relay, healthy, 2)  # at once: the upstream is not on hold
                # The dropped message waits for its own back-off only.
                assert (await relay.spool.get(first)).recipients[0].attempts == 1
                clock.advance(60)
                await wait_gone(relay.spool, first)
                assert sum(b"page 1\n" in d for d in healthy.dumps()) == 1


async def test_consecutive_drops_hold_the_upstream_and_a_success_resets_the_count(tmp_path: Path) -> None:
    assert DROPS_BEFORE_HOLD == 3
    clock = Clock()
    n = 0
    with smtp_sink("-q", ".") as sink:
        port = sink.port
        async with running_relay(settings_for(tmp_path, port), clock=clock) as relay:  # type: ignore[arg-type]
            for _ in range(DROPS_BEFORE_HOLD - 1):
                n += 1
                await dropped(relay, n)
                assert not held(relay)
            sink.stop()
            with smtp_sink(port=port) as healthy:
                n += 1
                await delivered(relay, healthy, n)  # resets the count
            with smtp_sink("-q", ".", port=port):
                for _ in range(DROPS_BEFORE_HOLD - 1):
                    n += 1
                    await dropped(relay, n)
                    assert not held(relay)
                n += 1
                await dropped(relay, n)  # the third drop in a row: now the upstream is held back
                assert held(relay)
                n += 1
                waiting = await sent(relay, n)
                await asyncio.sleep(0.6)  # three poll intervals: held, so not tried
                [r] = (await relay.spool.get(waiting)).recipients
                assert r.attempts == 0 and r.state is RcptState.QUEUED
            with smtp_sink(port=port) as healthy:
                clock.advance(30)  # the hold ends (at most 30 s): the waiting message goes
                await wait_gone(relay.spool, waiting)
                assert any(f"page {n}\n".encode() in d for d in healthy.dumps())
                assert not held(relay)
