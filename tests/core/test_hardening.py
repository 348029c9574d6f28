"""The rows of reliability.md for smuggling, TLS injection, connection caps and slow clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay365.service.relay import Relay
from tests.support import RawSMTP, RecordingUpstream, client_context, make_settings, running_relay, smarthost

SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\n", b"\r\n\x00.\r\n", b"\r\n.\r\r\n"]


@pytest.fixture
async def relay(
    tmp_path: Path, upstream: RecordingUpstream, request: pytest.FixtureRequest
) -> AsyncIterator[Relay]:
    marker = request.node.get_closest_marker("relay")
    extra: dict[str, Any] = marker.kwargs if marker else {}
    settings = make_settings(tmp_path, transport=[smarthost(upstream.port)], **extra)
    async with running_relay(settings) as r:
        yield r


async def open_transaction(relay: Relay) -> RawSMTP:
    c = await RawSMTP.connect(relay.ports["lan"])
    await c.reply()
    assert (await c.cmd("EHLO printer.lan")).startswith("250")
    assert (await c.cmd("MAIL FROM:<a@contoso.com>")).startswith("250")
    assert (await c.cmd("RCPT TO:<b@contoso.com>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    return c


@pytest.mark.parametrize("sequence", SMUGGLING, ids=repr)
async def test_smuggling_is_refused_and_nothing_is_queued(
    relay: Relay, upstream: RecordingUpstream, sequence: bytes
) -> None:
    c = await open_transaction(relay)
    payload = (
        b"Subject: hi\r\n\r\nhello"
        + sequence
        + b"MAIL FROM:<smuggled@x.com>\r\nRCPT TO:<victim@contoso.com>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nevil\r\n.\r\n"
    )
    await c.send(payload)
    reply = await c.reply()
    assert reply.startswith("550 5.6.11"), reply
    # The session is still in sync: the smuggled commands were data, not commands.
    assert (await c.cmd("NOOP")).startswith("250")
    await c.close()
    assert await relay.spool.list() == []
    assert upstream.messages == []


@pytest.mark.parametrize("sequence", SMUGGLING, ids=repr)
@pytest.mark.relay(listener=[{"name": "lan", "port": 0, "tls": "starttls", "bare_newlines": "normalize"}])
async def test_normalize_mode_delivers_one_message_only(
    relay: Relay, upstream: RecordingUpstream, sequence: bytes
) -> None:
    c = await open_transaction(relay)
    await c.send(b"Subject: hi\r\n\r\nhello" + sequence + b"MAIL FROM:<smuggled@x.com>\r\n.\r\n")
    assert (await c.reply()).startswith("250 2.0.0")
    [msg] = await upstream.wait_for(1)
    await asyncio.sleep(0.3)
    assert len(upstream.messages) == 1 and msg.mail_from == "a@contoso.com"
    body = msg.content.split(b"\r\n\r\n", 1)[1]
    assert b"\x00" not in body and body.count(b"\n") == body.count(b"\r\n")
    assert body.count(b"\r") == body.count(b"\r\n")
    await c.close()


async def test_long_data_lines_pass_through(relay: Relay, upstream: RecordingUpstream) -> None:
    """A deliberate choice: printers send lines over 998 octets; they are kept as sent."""
    c = await open_transaction(relay)
    lines = [b"a" * 998, b"b" * 1000, b"c" * 1100, b"d" * 200_000]
    await c.send(b"Subject: long\r\n\r\n" + b"\r\n".join(lines) + b"\r\n.\r\n")
    assert (await c.reply()).startswith("250")
    [msg] = await upstream.wait_for(1)
    assert msg.content.endswith(b"\r\n".join(lines) + b"\r\n")
    await c.close()


async def test_dot_stuffing_round_trip(relay: Relay, upstream: RecordingUpstream) -> None:
    c = await open_transaction(relay)
    await c.send(b"Subject: dots\r\n\r\n..leading\r\n...\r\n.\r\n")
    assert (await c.reply()).startswith("250")
    [msg] = await upstream.wait_for(1)
    assert msg.content.endswith(b"\r\n\r\n.leading\r\n..\r\n")
    await c.close()


async def test_starttls_injection_is_discarded(relay: Relay) -> None:
    c = await RawSMTP.connect(relay.ports["lan"])
    await c.reply()
    await c.cmd("EHLO printer.lan")
    await c.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<injected@x.com>\r\n")
    assert (await c.reply()).startswith("220")
    await c.writer.start_tls(client_context(), server_hostname="localhost")
    ehlo = await c.cmd("EHLO printer.lan")
    assert ehlo.startswith("250") and "AUTH PLAIN LOGIN" in ehlo
    # Had the injected MAIL been executed, this would be "503 nested MAIL".
    assert (await c.cmd("MAIL FROM:<a@contoso.com>")).startswith("250")
    await c.close()


@pytest.mark.relay(server={"max_connections": 5, "max_connections_per_ip": 3})
async def test_connection_caps_answer_421(relay: Relay) -> None:
    clients = [await RawSMTP.connect(relay.ports["lan"]) for _ in range(3)]
    for c in clients:
        assert (await c.reply()).startswith("220")
    extra = await RawSMTP.connect(relay.ports["lan"])
    assert (await extra.reply()).startswith("421 4.7.0")
    assert await extra.closed()
    await extra.close()
    await clients[0].cmd("QUIT")
    await clients[0].close()
    await asyncio.sleep(0.2)
    again = await RawSMTP.connect(relay.ports["lan"])
    assert (await again.reply()).startswith("220")
    for c in [*clients[1:], again]:
        await c.close()


@pytest.mark.relay(server={"max_connections": 2, "max_connections_per_ip": 10})
async def test_global_connection_cap(relay: Relay) -> None:
    a = await RawSMTP.connect(relay.ports["lan"])
    b = await RawSMTP.connect(relay.ports["lan"])
    assert (await a.reply()).startswith("220") and (await b.reply()).startswith("220")
    c = await RawSMTP.connect(relay.ports["lan"])
    assert (await c.reply()).startswith("421 4.7.0 Too many connections")
    for x in (a, b, c):
        await x.close()


@pytest.mark.relay(listener=[{"name": "lan", "port": 0, "tls": "starttls", "idle_timeout": 0.5}])
async def test_idle_and_drip_clients_time_out(relay: Relay) -> None:
    idle = await RawSMTP.connect(relay.ports["lan"])
    await idle.reply()
    assert await idle.closed(timeout=5)
    await idle.close()
    drip = await RawSMTP.connect(relay.ports["lan"])
    await drip.reply()
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises((ConnectionError, BrokenPipeError)):
        for ch in b"EHLO drip.example.com and more and more text\r\n":
            await drip.send(bytes([ch]))
            await asyncio.sleep(0.1)
            if drip.reader.at_eof():
                raise ConnectionResetError
    assert loop.time() - start < 5
    await drip.close()


async def test_connections_are_counted_and_released(relay: Relay) -> None:
    clients = []
    for _ in range(40):
        clients.append(await RawSMTP.connect(relay.ports["lan"]))
    for c in clients:
        assert (await c.reply()).startswith("220")
    assert relay.ingress is not None and relay.ingress.connections() == 40
    for c in clients:
        await c.close()
    await asyncio.sleep(0.2)
    assert relay.ingress.connections() == 0
