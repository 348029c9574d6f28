"""Non-ASCII addresses (issue 8, item 6; RFC 6531).

Without ``SMTPUTF8`` on MAIL, a non-ASCII sender or recipient is refused at once (553 5.6.7), so it
can never sit in the queue. With it, the message goes upstream with SMTPUTF8 when the upstream offers
the extension, and is bounced once (5.6.7, one DSN, the attempt recorded) when it does not.
"""

from __future__ import annotations

import email
import email.policy
import logging
from pathlib import Path

import pytest

from relay365.errors import PermanentDeliveryError
from relay365.netdns import make_async_resolver
from relay365.transports.mx import mx_host
from tests.support import (
    RawSMTP,
    RecordingUpstream,
    closed_port,
    make_settings,
    running_relay,
    smarthost,
    wait_gone,
)


async def session(port: int) -> RawSMTP:
    c = await RawSMTP.connect(port)
    await c.reply()
    assert "SMTPUTF8" in await c.cmd("EHLO printer.lan")
    return c


async def test_non_ascii_addresses_need_smtputf8(tmp_path: Path, upstream: RecordingUpstream) -> None:
    async with running_relay(make_settings(tmp_path, transport=[smarthost(upstream.port)])) as relay:
        c = await session(relay.ports["lan"])
        for sender in ("jörg@contoso.com", "scan@bücher.example"):
            reply = await c.cmd(f"MAIL FROM:<{sender}>")
            assert reply.startswith("553 5.6.7 ") and "SMTPUTF8" in reply, reply
        assert (await c.cmd("MAIL FROM:<scan@contoso.com>")).startswith("250")
        for rcpt in ("jörg@contoso.com", "bob@müller.example", "ﾃｽﾄ@contoso.com"):
            reply = await c.cmd(f"RCPT TO:<{rcpt}>")
            assert reply.startswith("553 5.6.7 "), reply
        assert (await c.cmd("RCPT TO:<bob@contoso.com>")).startswith("250")
        await c.close()
        assert await relay.spool.list() == []


async def send_utf8(port: int, rcpts: tuple[str, ...]) -> str:
    c = await session(port)
    assert (await c.cmd("MAIL FROM:<scan@contoso.com> SMTPUTF8")).startswith("250")
    for r in rcpts:
        assert (await c.cmd(f"RCPT TO:<{r}>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    reply = await c.cmd("Subject: Grüße\r\nFrom: scan@contoso.com\r\n\r\nBücher\r\n.".encode())
    assert reply.startswith("250 2.0.0"), reply
    await c.close()
    return reply.split()[-1]


async def test_smtputf8_goes_upstream_when_offered(tmp_path: Path) -> None:
    up = await RecordingUpstream(smtputf8=True).start()
    try:
        async with running_relay(make_settings(tmp_path, transport=[smarthost(up.port)])) as relay:
            await send_utf8(relay.ports["lan"], ("jörg@contoso.com", "bob@contoso.com"))
            [msg] = await up.wait_for(1)
            assert msg.mail_options == ["SMTPUTF8"]
            assert sorted(msg.rcpt_tos) == ["bob@contoso.com", "jörg@contoso.com"]
            assert "Grüße".encode() in msg.content
    finally:
        await up.stop()


async def test_smtputf8_bounces_once_when_the_upstream_lacks_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay365")
    up = await RecordingUpstream(smtputf8=False).start()
    try:
        settings = make_settings(tmp_path, transport=[smarthost(up.port)])
        async with running_relay(settings) as relay:
            qid = await send_utf8(relay.ports["lan"], ("jörg@contoso.com",))
            # One DSN to the sender, carried as plain mail (from <>, no SMTPUTF8 needed).
            [dsn] = await up.wait_for(1)
            assert dsn.mail_from in ("", "<>") and dsn.rcpt_tos == ["scan@contoso.com"]
            report = email.message_from_bytes(dsn.content, policy=email.policy.default)
            assert "5.6.7" in report.as_string()
            await wait_gone(relay.spool, qid)
            # The attempt was recorded with its reply, once: no retry every cool-down.
            attempts = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{qid} to=")]
            assert len(attempts) == 1 and "outcome=permanent reply='553 5.6.7 " in attempts[0], attempts
            assert relay.scheduler is not None
            await relay.scheduler.drain()
            assert len(up.messages) == 1 and await relay.spool.list() == []
    finally:
        await up.stop()


async def test_ascii_recipients_still_go_when_only_others_need_smtputf8(tmp_path: Path) -> None:
    """An ASCII sender and header section: only the non-ASCII recipient is bounced."""
    up = await RecordingUpstream(smtputf8=False).start()
    try:
        async with running_relay(make_settings(tmp_path, transport=[smarthost(up.port)])) as relay:
            c = await session(relay.ports["lan"])
            assert (await c.cmd("MAIL FROM:<scan@contoso.com> SMTPUTF8")).startswith("250")
            assert (await c.cmd("RCPT TO:<jörg@contoso.com>")).startswith("250")
            assert (await c.cmd("RCPT TO:<bob@contoso.com>")).startswith("250")
            assert (await c.cmd("DATA")).startswith("354")
            assert (await c.cmd(b"Subject: plain\r\n\r\nx\r\n.")).startswith("250 2.0.0")
            await c.close()
            msgs = await up.wait_for(2)
            by_rcpt = {tuple(m.rcpt_tos): m for m in msgs}
            assert by_rcpt[("bob@contoso.com",)].mail_options == []
            assert by_rcpt[("scan@contoso.com",)].mail_from in ("", "<>")  # the DSN for jörg
    finally:
        await up.stop()


async def test_undecodable_international_domain_is_permanent() -> None:
    """A non-ASCII domain that has no DNS form fails for good at once (no retry every cool-down);
    the name is refused before any query is sent."""
    resolver = make_async_resolver((f"127.0.0.1:{closed_port()}",))
    with pytest.raises(PermanentDeliveryError, match=r"^553 5\.1\.2 "):
        await mx_host(resolver, "ü" * 60 + ".example")
