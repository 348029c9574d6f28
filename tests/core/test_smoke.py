"""Device -> relay365 -> upstream, end to end over loopback sockets."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

from tests.support import RecordingUpstream, make_settings, running_relay, smarthost


async def test_message_flows_to_upstream(tmp_path: Path, upstream: RecordingUpstream) -> None:
    settings = make_settings(tmp_path, transport=[smarthost(upstream.port)])
    async with running_relay(settings) as relay:
        port = relay.ports["lan"]

        def client() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.ehlo("printer.lan")
                s.mail("scanner@contoso.com")
                s.rcpt("alice@contoso.com")
                return s.data(b"Subject: scan\r\n\r\nhello\r\n")

        code, reply = await asyncio.to_thread(client)
        assert code == 250 and reply.startswith(b"2.0.0 Ok: queued as ")
        queue_id = reply.split()[-1].decode()
        [msg] = await upstream.wait_for(1)
        assert msg.mail_from == "scanner@contoso.com" and msg.rcpt_tos == ["alice@contoso.com"]
        assert msg.content.startswith(b"Received: from printer.lan ([127.0.0.1])")
        assert f"id {queue_id}".encode() in msg.content
        assert msg.content.endswith(b"Subject: scan\r\n\r\nhello\r\n")
