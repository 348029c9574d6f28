"""Command lines end with CRLF and nothing else (RFC 5321 2.3.8), and are UTF-8 (issue 8, items 6, 7).

A bare LF inside a command line is not a line end: with ``bare_newlines = "reject"`` it is refused
and nothing after it is read as a command; with ``"normalize"`` it ends the line, as it does in DATA.
A bare CR or NUL, or bytes that are not UTF-8, in any command line (AUTH responses included) are
refused with a 5xx.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay365.credentials import hash_password
from relay365.service.relay import Relay
from tests.support import RawSMTP, RecordingUpstream, make_settings, running_relay, smarthost


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
    await c.reply()
    assert (await c.cmd("EHLO printer.lan")).startswith("250")
    return c


async def read_all(c: RawSMTP, timeout: float = 10.0) -> str:
    """Every reply until the server closes the connection."""
    return (await asyncio.wait_for(c.reader.read(), timeout)).decode("utf-8", "replace")


PIPELINED = b"MAIL FROM:<a@contoso.com>\nRCPT TO:<b@contoso.com>\r\n"


@pytest.mark.parametrize("segments", ["one", "split"])
async def test_bare_lf_in_command_is_refused_and_nothing_after_it_runs(relay: Relay, segments: str) -> None:
    c = await session(relay)
    if segments == "one":
        await c.send(PIPELINED + b"DATA\r\n")
    else:
        await c.send(PIPELINED[:26])  # up to and including the bare LF
        await asyncio.sleep(0.1)
        await c.send(PIPELINED[26:] + b"DATA\r\n")
    rest = await read_all(c)
    # One refusal, then the server closes: neither RCPT nor DATA was taken as a command.
    assert rest.startswith("500 5.5.2 Bare LF in command line"), rest
    assert rest.count("\r\n") == 1, rest
    await c.close()
    assert await relay.spool.list() == []


@pytest.mark.relay(listener=[{"name": "lan", "port": 0, "tls": "starttls", "bare_newlines": "normalize"}])
async def test_bare_lf_in_command_ends_the_line_when_normalizing(
    relay: Relay, upstream: RecordingUpstream
) -> None:
    c = await session(relay)
    await c.send(PIPELINED + b"DATA\n")
    assert [(await c.reply())[:3] for _ in range(3)] == ["250", "250", "354"]
    assert (await c.cmd(b"Subject: lf\r\n\r\nx\r\n.")).startswith("250 2.0.0")
    [msg] = await upstream.wait_for(1)
    assert msg.mail_from == "a@contoso.com" and msg.rcpt_tos == ["b@contoso.com"]
    await c.close()


@pytest.mark.parametrize("mode", ["reject", "normalize"])
async def test_bare_cr_and_nul_in_a_command_are_refused(tmp_path: Path, mode: str) -> None:
    settings = make_settings(tmp_path, listener=[{"name": "lan", "port": 0, "bare_newlines": mode}])
    async with running_relay(settings) as relay:
        c = await session(relay)
        assert (await c.cmd(b"NOOP x\rRSET")).startswith("500 5.5.2 ")
        assert (await c.cmd(b"NOOP x\x00y")).startswith("500 5.5.2 ")
        assert (await c.cmd(b"MAIL FROM:<a@contoso.com>\r")).startswith("500 5.5.2 ")
        # Still in sync: the line ended at CRLF and the session goes on.
        assert (await c.cmd("MAIL FROM:<a@contoso.com>")).startswith("250")
        await c.close()


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL FROM:<\xff@contoso.com>",
        b"MAIL FROM:<j\xc3@contoso.com> SMTPUTF8",
        b"NOOP \xfe\xff",
        b"VRFY \xc3(",
        b"EHLO \xe2\x28\xa1",
    ],
    ids=repr,
)
async def test_invalid_utf8_in_a_command_is_refused(relay: Relay, line: bytes) -> None:
    c = await session(relay)
    reply = await c.cmd(line)
    assert reply.startswith("500 5.5.2 ") and "UTF-8" in reply, reply
    assert (await c.cmd("NOOP")).startswith("250")
    await c.close()
    assert await relay.spool.list() == []


async def test_invalid_utf8_sender_with_smtputf8_is_never_queued(relay: Relay) -> None:
    c = await session(relay)
    assert (await c.cmd(b"MAIL FROM:<j\xc3\xb6rg@contoso.com> SMTPUTF8")).startswith("250")
    assert (await c.cmd(b"RCPT TO:<\xed\xa0\x80@contoso.com>")).startswith("500 5.5.2 ")  # a surrogate
    await c.close()


PASSWORD = "Pr1nter-Secret!"


@pytest.mark.relay(
    listener=[{"name": "lan", "port": 0, "tls": "none", "allow_plaintext_auth": True}],
    device=[{"name": "mfp", "password_hash": hash_password(PASSWORD)}],
)
async def test_bare_lf_in_an_auth_response_is_refused(relay: Relay) -> None:
    c = await session(relay)
    assert (await c.cmd("AUTH LOGIN")).startswith("334")
    user = base64.b64encode(b"mfp")
    await c.send(user + b"\nMAIL FROM:<a@contoso.com>\r\n")
    rest = await read_all(c)
    assert rest.startswith("500 5.5.2 ") and rest.count("\r\n") == 1, rest
    await c.close()
