"""The relay delivering to a recording upstream (tests/core/test_delivery*.py): its settings, a message
sent into it, one more scheduler pass on a clock the test moves, a DSN checked for its RFC 3464 form.
``from tests.support.delivery import ...`` (``send`` and ``settle`` are names other helpers use too).
"""

from __future__ import annotations

import asyncio
import email
from email.message import Message
from pathlib import Path
from typing import Any

from relay365.service.relay import Relay
from tests.support.helpers import Clock, send_message
from tests.support.relay import Received, make_settings, smarthost

ORIGINAL = (
    b"From: Scanner <scanner@contoso.com>\r\nTo: alice@contoso.com\r\n"
    b"Subject: quarterly report\r\nMessage-ID: <scan-42@contoso.com>\r\n\r\nSee attachment.\r\n"
)
NO_TLS = [{"name": "lan", "port": 0, "tls": "none"}]


def settings_for(tmp_path: Path, port: int, **extra: Any) -> Any:
    extra.setdefault("transport", [smarthost(port)])
    return make_settings(tmp_path, listener=NO_TLS, **extra)


async def send(relay: Relay, **kwargs: Any) -> str:
    kwargs.setdefault("body", ORIGINAL)
    return await asyncio.to_thread(send_message, relay.ports["lan"], **kwargs)


def parts_of(msg: Message) -> list[Message]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, Message)]


def parse_dsn(received: Received) -> tuple[Message, list[Message], bytes]:
    """Check the RFC 3464 structure; return (message, per-recipient status blocks, original headers)."""
    assert received.mail_from in ("", "<>")  # from the null sender (aiosmtpd records "<>")
    msg = email.message_from_bytes(received.content)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied"
    parts = parts_of(msg)
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    blocks = parts_of(parts[1])
    assert blocks[0]["Reporting-MTA"] == "dns; relay.test"
    assert blocks[0]["Arrival-Date"]
    headers = parts[2].get_payload(decode=True)
    assert isinstance(headers, bytes)
    return msg, blocks[1:], headers


async def settle(relay: Relay, clock: Clock, passes: int = 4, step: float = 3600.0) -> None:
    """Move the clock and let the scheduler run several passes (poll interval 0.2 s)."""
    for _ in range(passes):
        clock.advance(step)
        relay.scheduler.wake()  # type: ignore[union-attr]
        await asyncio.sleep(0.3)
        assert relay.scheduler is not None
        await relay.scheduler.drain()
