"""The header section a device sends, checked while DATA streams (issue 8, items 1 and 8).

A folded (whitespace-led) first line would continue a field the relay writes (Received, and From /
Reply-To when the sender is rewritten); header lines over RFC 5322's 998 octets and header sections
over the listener's limit would be refused later by Microsoft as an NDR. All are refused at "."
with a clear reply, with or without a sender rewrite, however TCP splits the stream. What reaches the
upstream is read back with Python's ``email`` parser.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay365.service.relay import Relay
from tests.support import RawSMTP, RecordingUpstream, make_settings, running_relay, smarthost

MAILBOX = "scanner@contoso.com"
REWRITE = {"name": "mfp", "ip_allow": ["127.0.0.1/32"], "rewrite_sender": MAILBOX}
PLAIN = {"name": "mfp", "ip_allow": ["127.0.0.1/32"]}


@pytest.fixture
async def relay(
    tmp_path: Path, upstream: RecordingUpstream, request: pytest.FixtureRequest
) -> AsyncIterator[Relay]:
    marker = request.node.get_closest_marker("relay")
    extra: dict[str, Any] = dict(marker.kwargs) if marker else {}
    rewrite = getattr(request, "param", True)
    extra.setdefault("device", [REWRITE if rewrite else PLAIN])
    settings = make_settings(tmp_path, transport=[smarthost(upstream.port)], **extra)
    async with running_relay(settings) as r:
        yield r


async def data_session(relay: Relay, mail_from: str = "root@mfp-3f.contoso.com") -> RawSMTP:
    c = await RawSMTP.connect(relay.ports["lan"])
    await c.reply()
    assert (await c.cmd("EHLO printer.lan")).startswith("250")
    assert (await c.cmd(f"MAIL FROM:<{mail_from}>")).startswith("250")
    assert (await c.cmd("RCPT TO:<bob@contoso.com>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    return c


async def send_split(c: RawSMTP, data: bytes, *, at: list[int]) -> None:
    """Send ``data`` in separate TCP segments cut at the offsets ``at``."""
    last = 0
    for cut in [*at, len(data)]:
        await c.send(data[last:cut])
        await asyncio.sleep(0.05)  # let each piece arrive on its own
        last = cut


def parsed(content: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(content, policy=email.policy.SMTP)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


ORPHAN = b" <attacker@evil.example>\r\n"  # a continuation line with no field before it
FOLDED_FIRST = [
    ORPHAN + b"From: MFP <root@mfp-3f.contoso.com>\r\nSubject: scan\r\n\r\nbody\r\n",
    b"\t, attacker@evil.example\r\nSubject: scan\r\n\r\nbody\r\n",
    ORPHAN + b"\r\nbody without fields\r\n",
]


@pytest.mark.parametrize("relay", [True, False], ids=["rewrite", "no-rewrite"], indirect=True)
@pytest.mark.parametrize("segments", ["one", "split"])
@pytest.mark.parametrize("body", FOLDED_FIRST, ids=["before-from", "tab", "no-fields"])
async def test_folded_first_line_is_refused(
    relay: Relay, upstream: RecordingUpstream, segments: str, body: bytes
) -> None:
    """Refused with 550 5.6.0 however TCP splits it; nothing is queued. The same device's
    well-formed message then arrives with exactly one From (the mailbox when rewritten) and one
    Received from the relay that no device byte extends."""
    c = await data_session(relay)
    data = body + b".\r\n"
    if segments == "one":
        await c.send(data)
    else:
        await send_split(c, data, at=[1, 3, len(ORPHAN) - 1, len(ORPHAN) + 2])
    reply = await c.reply()
    assert reply.startswith("550 5.6.0 "), reply
    assert "folded" in reply
    assert await relay.spool.list() == []

    # The session is in sync and the next, well-formed message goes through untouched.
    assert (await c.cmd("MAIL FROM:<root@mfp-3f.contoso.com>")).startswith("250")
    assert (await c.cmd("RCPT TO:<bob@contoso.com>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    good = b"From: MFP <root@mfp-3f.contoso.com>\r\nSubject: scan\r\n\r\nbody\r\n.\r\n"
    await send_split(c, good, at=[1, 7]) if segments == "split" else await c.send(good)
    assert (await c.reply()).startswith("250 2.0.0")
    await c.close()
    [msg] = await upstream.wait_for(1)
    assert upstream.messages == [msg]
    m = parsed(msg.content)
    froms = m.get_all("From")
    rewritten = relay.settings.devices[0].rewrite_sender is not None
    assert [str(f) for f in froms] == ([MAILBOX] if rewritten else ["MFP <root@mfp-3f.contoso.com>"])
    received = m.get_all("Received")
    assert len(received) == 1 and "by relay.test (relay365)" in str(received[0])
    assert b"evil" not in msg.content
    assert msg.content.endswith(b"\r\nSubject: scan\r\n\r\nbody\r\n") and m.get_content() == "body\r\n"


@pytest.mark.parametrize("relay", [True], ids=["rewrite"], indirect=True)
async def test_relay_written_fields_are_never_extended(relay: Relay, upstream: RecordingUpstream) -> None:
    """Every field the relay writes (Received, From, Reply-To) ends before the device's first field,
    whatever the device's own From looks like (folded, repeated)."""
    c = await data_session(relay)
    device_headers = (
        b"From: MFP\r\n <root@mfp-3f.contoso.com>\r\n"
        b"From: second <other@evil.example>\r\n"
        b"Subject: scan\r\n folded subject\r\n\r\nbody\r\n"
    )
    await c.send(device_headers + b".\r\n")
    assert (await c.reply()).startswith("250 2.0.0")
    await c.close()
    [msg] = await upstream.wait_for(1)
    m = parsed(msg.content)
    assert [str(f) for f in m.get_all("From")] == [MAILBOX]
    assert len(m.get_all("Reply-To")) == 1
    assert "root@mfp-3f.contoso.com" in str(m["Reply-To"]) and "evil" not in str(m["Reply-To"])
    assert "evil" not in str(m["Received"]) and "folded subject" in str(m["Subject"])


LONG = b"X-Long: " + b"a" * 991  # 999 octets before CRLF
EXACT = b"X-Long: " + b"a" * 990  # 998 octets: the RFC 5322 2.1.1 maximum


@pytest.mark.parametrize("relay", [True, False], ids=["rewrite", "no-rewrite"], indirect=True)
@pytest.mark.parametrize("segments", ["one", "split"])
async def test_header_line_over_998_octets_is_refused(
    relay: Relay, upstream: RecordingUpstream, segments: str
) -> None:
    c = await data_session(relay)
    data = b"Subject: long\r\n" + LONG + b"\r\n\r\nbody\r\n.\r\n"
    if segments == "one":
        await c.send(data)
    else:
        await send_split(c, data, at=[20, 500, 1000, 1013])
    reply = await c.reply()
    assert reply.startswith("554 5.6.0 ") and "998" in reply, reply
    assert await relay.spool.list() == []
    # 998 octets are fine, in the header section and (a deliberate choice) longer in the body.
    assert (await c.cmd("MAIL FROM:<root@mfp-3f.contoso.com>")).startswith("250")
    assert (await c.cmd("RCPT TO:<bob@contoso.com>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    await c.send(b"Subject: ok\r\n" + EXACT + b"\r\n\r\n" + b"b" * 5000 + b"\r\n.\r\n")
    assert (await c.reply()).startswith("250 2.0.0")
    await c.close()
    [msg] = await upstream.wait_for(1)
    assert EXACT + b"\r\n" in msg.content and b"b" * 5000 + b"\r\n" in msg.content


@pytest.mark.parametrize("relay", [True, False], ids=["rewrite", "no-rewrite"], indirect=True)
@pytest.mark.relay(listener=[{"name": "lan", "port": 0, "tls": "starttls", "max_header_size": 4096}])
async def test_header_section_over_the_listener_limit_is_refused(
    relay: Relay, upstream: RecordingUpstream
) -> None:
    c = await data_session(relay)
    fields = b"".join(b"X-Field-%03d: %s\r\n" % (i, b"v" * 80) for i in range(60))  # ~5.9 KB
    await c.send(b"Subject: big\r\n" + fields + b"\r\nbody\r\n.\r\n")
    reply = await c.reply()
    assert reply.startswith("552 5.3.4 ") and "header" in reply and "4096" in reply, reply
    assert await relay.spool.list() == []
    # A header section under the limit (the relay's own Received counts too) passes.
    assert (await c.cmd("MAIL FROM:<root@mfp-3f.contoso.com>")).startswith("250")
    assert (await c.cmd("RCPT TO:<bob@contoso.com>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    await c.send(b"Subject: fits\r\n" + fields[: 30 * 95] + b"\r\nbody\r\n.\r\n")
    assert (await c.reply()).startswith("250 2.0.0")
    await c.close()
    [msg] = await upstream.wait_for(1)
    assert parsed(msg.content)["Subject"] == "fits"


async def test_header_limit_default_is_exchange_onlines(tmp_path: Path) -> None:
    """Exchange Online refuses header sections over 256 KB; the listener default says the same."""
    settings = make_settings(tmp_path)
    assert settings.listeners[0].max_header_size == 256 * 1024
