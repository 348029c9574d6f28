"""An unreachable upstream is not tried for every message: its mail waits, then flows."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

from tests.support import RecordingUpstream, closed_port, make_settings, running_relay, smarthost


def send(port: int, n: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        for i in range(n):
            s.sendmail("scan@contoso.com", ["bob@contoso.com"], f"Subject: {i}\r\n\r\nx\r\n".encode())


async def test_dead_upstream_is_held_back_then_drained(tmp_path: Path) -> None:
    port = closed_port()
    settings = make_settings(
        tmp_path,
        transport=[smarthost(port)],
        delivery={"min_backoff": 2, "max_backoff": 2, "poll_interval": 0.1},
    )
    async with running_relay(settings) as relay:
        await asyncio.to_thread(send, relay.ports["lan"], 20)
        await asyncio.sleep(0.5)
        entries = await relay.spool.list()
        attempts = sorted(e.recipients[0].attempts for e in entries)
        # One connection attempt failed; the other 19 messages were held back, not tried.
        assert len(entries) == 20 and sum(attempts) <= 2, attempts
        # The upstream comes back on the same port: everything drains after the hold-back.
        up = RecordingUpstream()
        loop = asyncio.get_running_loop()
        up._server = await loop.create_server(up._factory, host="127.0.0.1", port=port)
        try:
            await up.wait_for(20, timeout=15)
        finally:
            await up.stop()
