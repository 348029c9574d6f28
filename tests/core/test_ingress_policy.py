"""Per-device policy, decided before queuing, with precise replies (real sessions over loopback)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay365.service.relay import Relay
from tests.support import (
    RawSMTP,
    RecordingUpstream,
    body_files,
    body_of,
    make_settings,
    running_relay,
    smarthost,
)


@pytest.fixture
async def relay(
    tmp_path: Path, upstream: RecordingUpstream, request: pytest.FixtureRequest
) -> AsyncIterator[Relay]:
    marker = request.node.get_closest_marker("relay")
    extra: dict[str, Any] = marker.kwargs if marker else {}
    settings = make_settings(tmp_path, transport=[smarthost(upstream.port)], **extra)
    async with running_relay(settings) as r:
        yield r


async def session(relay: Relay) -> RawSMTP:
    c = await RawSMTP.connect(relay.ports["lan"])
    assert (await c.reply()).startswith("220 relay.test")
    assert (await c.cmd("EHLO printer.lan")).startswith("250")
    return c


async def queue_count(relay: Relay) -> int:
    return len(await relay.spool.list())


@pytest.mark.relay(device=[{"name": "other", "ip_allow": ["10.9.9.0/24"]}])
async def test_unknown_ip_is_refused_before_queuing(relay: Relay) -> None:
    c = await session(relay)
    # AUTH is offered on this listener (after STARTTLS), so the reply asks for it.
    assert (await c.cmd("MAIL FROM:<a@contoso.com>")).startswith("530 5.7.0")
    await c.close()


@pytest.mark.relay(
    listener=[{"name": "lan", "port": 0, "tls": "none", "auth": False}],
    device=[{"name": "other", "ip_allow": ["10.9.9.0/24"]}],
)
async def test_unknown_ip_without_auth_is_not_a_relay(relay: Relay) -> None:
    c = await session(relay)
    assert (await c.cmd("MAIL FROM:<a@contoso.com>")).startswith("550 5.7.1 Client host [127.0.0.1]")
    await c.close()


@pytest.mark.relay(
    device=[
        {
            "name": "scanner",
            "ip_allow": ["127.0.0.1/32"],
            "allowed_senders": ["scanner@contoso.com", "@fabrikam.com"],
            "allowed_recipient_domains": ["contoso.com"],
        }
    ]
)
async def test_sender_and_recipient_rules(relay: Relay) -> None:
    c = await session(relay)
    assert (await c.cmd("MAIL FROM:<ceo@contoso.com>")).startswith("550 5.7.1 Device scanner may not")
    assert (await c.cmd("MAIL FROM:<any@fabrikam.com>")).startswith("250")
    assert (await c.cmd("RSET")).startswith("250")
    assert (await c.cmd("MAIL FROM:<Scanner@Contoso.com>")).startswith("250")
    assert (await c.cmd("RCPT TO:<bob@example.org>")).startswith("550 5.7.1")
    assert (await c.cmd("RCPT TO:<bob@contoso.com>")).startswith("250")
    await c.close()


@pytest.mark.relay(
    device=[{"name": "printer", "ip_allow": ["127.0.0.1/32"], "max_recipients": 3, "max_message_size": 2000}]
)
async def test_size_and_recipient_limits(relay: Relay) -> None:
    c = await session(relay)
    ehlo = await c.cmd("EHLO printer.lan")
    assert "250-SIZE 2000" in ehlo
    assert (await c.cmd("MAIL FROM:<p@contoso.com> SIZE=5000")).startswith("552 5.3.4")
    assert (await c.cmd("MAIL FROM:<p@contoso.com> SIZE=1e12")).startswith("501")
    assert (await c.cmd("MAIL FROM:<p@contoso.com> SIZE=1000")).startswith("250")
    for i in range(3):
        assert (await c.cmd(f"RCPT TO:<u{i}@contoso.com>")).startswith("250")
    assert (await c.cmd("RCPT TO:<u9@contoso.com>")).startswith("452 4.5.3")
    assert (await c.cmd("DATA")).startswith("354")
    await c.send(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 60 + b"y" * 3000 + b"\r\n.\r\n")
    assert (await c.reply()).startswith("552 5.3.4")
    assert await queue_count(relay) == 0
    await c.close()


async def test_five_thousand_recipients(relay: Relay) -> None:
    """The listener limit (default 500, as Exchange Online) answers 452 4.5.3 past it, pipelined."""
    c = await session(relay)
    assert (await c.cmd("MAIL FROM:<p@contoso.com>")).startswith("250")
    await c.send(b"".join(f"RCPT TO:<u{i}@contoso.com>\r\n".encode() for i in range(5000)))
    replies = [await c.reply() for _ in range(5000)]
    assert all(r.startswith("250") for r in replies[:500])
    assert all(r.startswith("452 4.5.3") for r in replies[500:])
    await c.close()


@pytest.mark.relay(
    device=[{"name": "mfp", "ip_allow": ["127.0.0.1/32"], "rewrite_sender": "scanner@contoso.com"}]
)
async def test_sender_rewrite(relay: Relay, upstream: RecordingUpstream) -> None:
    c = await session(relay)
    assert (await c.cmd("MAIL FROM:<root@mfp-3f.local>")).startswith("250")
    assert (await c.cmd("RCPT TO:<bob@contoso.com>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    reply = await c.cmd(b"From: MFP 3F <root@mfp-3f.local>\r\nSubject: scan\r\n\r\nbody\r\n.")
    assert reply.startswith("250 2.0.0")
    [msg] = await upstream.wait_for(1)
    assert msg.mail_from == "scanner@contoso.com"
    headers = msg.content.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nFrom: scanner@contoso.com\r\n" in headers
    assert b"\r\nReply-To: MFP 3F <root@mfp-3f.local>\r\n" in headers + b"\r\n"
    assert b"root@mfp-3f.local>\r\nSubject" in headers or b"Subject: scan" in headers
    assert headers.count(b"From:") == 1
    await c.close()


@pytest.mark.relay(
    device=[{"name": "mfp", "ip_allow": ["127.0.0.1/32"], "rewrite_sender": "scanner@contoso.com"}]
)
async def test_unqualified_sender_is_fine_when_rewritten(relay: Relay, upstream: RecordingUpstream) -> None:
    """Printers often send as root@printer; with a rewrite that address never goes upstream."""
    c = await session(relay)
    assert (await c.cmd("MAIL FROM:<root@printer>")).startswith("250")
    assert (await c.cmd("RCPT TO:<bob@intranet>")).startswith("504 5.5.2 <bob@intranet>: Recipient")
    assert (await c.cmd("RCPT TO:<bob@contoso.com>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    assert (await c.cmd(b"From: root@printer\r\nSubject: scan\r\n\r\nbody\r\n.")).startswith("250 2.0.0")
    [msg] = await upstream.wait_for(1)
    assert msg.mail_from == "scanner@contoso.com" and msg.rcpt_tos == ["bob@contoso.com"]
    await c.close()


async def test_unqualified_sender_is_refused_without_rewrite(relay: Relay) -> None:
    c = await session(relay)
    reply = await c.cmd("MAIL FROM:<root@printer>")
    assert reply.startswith("504 5.5.2 <root@printer>: Sender address rejected: need fully-qualified")
    await c.close()
    assert await queue_count(relay) == 0


@pytest.mark.relay(device=[{"name": "app", "ip_allow": ["127.0.0.1/32"], "max_messages_per_minute": 2}])
async def test_device_rate_limit(relay: Relay) -> None:
    c = await session(relay)
    for _ in range(2):
        assert (await c.cmd("MAIL FROM:<a@contoso.com>")).startswith("250")
        assert (await c.cmd("RCPT TO:<b@contoso.com>")).startswith("250")
        assert (await c.cmd("DATA")).startswith("354")
        assert (await c.cmd(b"Subject: x\r\n\r\nx\r\n.")).startswith("250")
    assert (await c.cmd("MAIL FROM:<a@contoso.com>")).startswith("450 4.7.1 Device app is over")
    await c.close()
    assert await queue_count(relay) <= 2


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ('RCPT TO:<"u@ext.com"@contoso.com>', "553"),
        ("RCPT TO:<u%ext.com@[127.0.0.1]>", "553"),
        ("RCPT TO:<u@ext.com@[127.0.0.1]>", "553"),
        ("RCPT TO:<@[127.0.0.1]:u@ext.com>", "553"),
        ("RCPT TO:<ext.com!u@contoso.com>", "553"),
        ("RCPT TO:<u@[127.0.0.1]>", "553"),
        ("RCPT TO:<bob@contoso.com> NOTIFY=SUCCESS", "555"),
    ],
)
async def test_open_relay_address_forms_refused(relay: Relay, command: str, expected: str) -> None:
    c = await session(relay)
    assert (await c.cmd("MAIL FROM:<a@contoso.com>")).startswith("250")
    assert (await c.cmd(command)).startswith(expected)
    await c.close()


async def test_bad_mail_parameters(relay: Relay) -> None:
    c = await session(relay)
    assert (await c.cmd("MAIL FROM:<a@contoso.com> BODY=BINARYMIME")).startswith("501")
    assert (await c.cmd("MAIL FROM:<a@contoso.com> SIZE=99999999999")).startswith("552")
    assert (await c.cmd("MAIL FROM:<a@contoso.com> FOO=BAR")).startswith("555")
    assert (await c.cmd("MAIL FROM:<a\rb@contoso.com>")).startswith("500 5.5.2 Bare CR")
    await c.close()


async def test_crlf_in_helo_is_rejected(relay: Relay) -> None:
    c = await RawSMTP.connect(relay.ports["lan"])
    await c.reply()
    assert (await c.cmd(b"EHLO foo\rX-Inj: 1")).startswith("500 5.5.2 Bare CR")
    assert (await c.cmd(b"HELO foo bar")).startswith("501 5.5.4")
    assert (await c.cmd("MAIL FROM:<a@contoso.com>")).startswith("503")
    await c.close()


async def test_long_command_line(relay: Relay) -> None:
    c = await session(relay)
    assert (await c.cmd("NOOP " + "x" * 600)).startswith("500")
    assert (await c.cmd("NOOP")).startswith("250")
    await c.close()


async def test_pipelined_transactions_are_separate(relay: Relay, upstream: RecordingUpstream) -> None:
    c = await session(relay)
    await c.send(b"MAIL FROM:<a@contoso.com>\r\nRCPT TO:<one@contoso.com>\r\nDATA\r\n")
    assert [(await c.reply())[:3] for _ in range(3)] == ["250", "250", "354"]
    await c.send(
        b"Subject: 1\r\n\r\none\r\n.\r\nMAIL FROM:<b@contoso.com>\r\nRCPT TO:<two@contoso.com>\r\nDATA\r\n"
    )
    assert [(await c.reply())[:3] for _ in range(4)] == ["250", "250", "250", "354"]
    assert (await c.cmd(b"Subject: 2\r\n\r\ntwo\r\n.")).startswith("250")
    msgs = await upstream.wait_for(2)
    by_rcpt = {m.rcpt_tos[0]: m for m in msgs}
    assert by_rcpt["one@contoso.com"].mail_from == "a@contoso.com"
    assert by_rcpt["two@contoso.com"].mail_from == "b@contoso.com"
    assert by_rcpt["two@contoso.com"].content.endswith(b"Subject: 2\r\n\r\ntwo\r\n")
    await c.close()


async def test_disconnect_at_final_dot_leaves_complete_or_nothing(relay: Relay) -> None:
    for _ in range(5):
        c = await session(relay)
        await c.send(b"MAIL FROM:<a@contoso.com>\r\nRCPT TO:<b@contoso.com>\r\nDATA\r\n")
        for _ in range(3):
            await c.reply()
        await c.send(b"Subject: cut\r\n\r\nbody\r\n.\r\n")
        await c.close()
    await asyncio.sleep(0.3)
    for entry in await relay.spool.list():
        assert (await body_of(relay.spool, entry)).endswith(b"Subject: cut\r\n\r\nbody\r\n")
    files = set(body_files(relay.spool.messages_dir))  # type: ignore[attr-defined]
    assert files >= {e.queue_id for e in await relay.spool.list()}
