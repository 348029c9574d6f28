"""Failed TLS handshakes on device listeners (issue 8, item 14): one log line each with the peer, the
listener, what the client offered and why it failed, rate-limited per peer, never a traceback.

Real clients over loopback: ``openssl s_client`` offering a TLS version the listener refuses (implicit
TLS and STARTTLS), a plain-text SMTP client on the implicit TLS port, and a port-scan-like burst of
connections that close at once. The relay runs on a hand-moved clock, so the rate-limit window is
controlled by the test, never by the wall clock.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import subprocess
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay365.ingress.clienthello import describe
from relay365.ingress.handshake import (
    PER_PEER_PER_WINDOW,
    WINDOW,
    HandshakeLog,
    HandshakeThrottle,
    ImplicitTLSAcceptor,
)
from relay365.ingress.tls import server_context
from relay365.service.relay import Relay
from relay365.settings import ListenerSettings
from tests.support import (
    Clock,
    RawSMTP,
    RecordingUpstream,
    client_context,
    make_settings,
    running_relay,
    smarthost,
)

LOGGER = "relay365.ingress.handshake"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def relay(
    tmp_path: Path, upstream: RecordingUpstream, server_cert: tuple[Path, Path], clock: Clock
) -> AsyncIterator[Relay]:
    cert, key = server_cert
    tls = {"cert_file": str(cert), "key_file": str(key)}
    settings = make_settings(
        tmp_path,
        transport=[smarthost(upstream.port)],
        listener=[
            {"name": "smtps", "port": 0, "tls": "implicit", **tls},
            {"name": "lan", "port": 0, "tls": "starttls", **tls},
        ],
    )
    async with running_relay(settings, clock=clock) as r:
        yield r


def handshake_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def noise(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Everything else a failed handshake could put in the log: other loggers' warnings, tracebacks."""
    return [
        r
        for r in caplog.records
        if (r.name != LOGGER and r.levelno >= logging.WARNING) or r.exc_info or r.exc_text
    ]


async def lines_reach(caplog: pytest.LogCaptureFixture, count: int, timeout: float = 20.0) -> list[str]:
    """Wait (bounded) until the handshake logger has written ``count`` lines; the server logs a
    failure after the client may already have seen the connection close."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(handshake_lines(caplog)) < count:
        if loop.time() > deadline:
            raise TimeoutError(f"expected {count} handshake lines, got {handshake_lines(caplog)}")
        await asyncio.sleep(0.02)
    return handshake_lines(caplog)


async def openssl(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return await asyncio.to_thread(
        subprocess.run,
        ["openssl", "s_client", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )


async def test_refused_tls_version_is_one_line_on_implicit_and_starttls(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    old = ("-tls1", "-cipher", "DEFAULT@SECLEVEL=0")
    r = await openssl("-connect", f"127.0.0.1:{relay.ports['smtps']}", *old)
    assert r.returncode != 0 and b"CONNECTED" in r.stdout
    await lines_reach(caplog, 1)
    r = await openssl("-connect", f"127.0.0.1:{relay.ports['lan']}", "-starttls", "smtp", *old)
    assert r.returncode != 0
    lines = await lines_reach(caplog, 2)
    await asyncio.sleep(0.2)  # anything else the failures would log has had its chance
    assert len(handshake_lines(caplog)) == 2, handshake_lines(caplog)
    for line, listener, how in zip(lines, ("smtps", "lan"), ("implicit TLS", "STARTTLS"), strict=True):
        assert "\n" not in line
        assert "peer=127.0.0.1" in line and f"listener={listener}" in line and how in line, line
        assert "offered=TLSv1.0" in line, line  # what the client offered, read from its ClientHello
        assert "UNSUPPORTED_PROTOCOL" in line and "TLS 1.2" in line and "legacy" in line, line
    assert noise(caplog) == []


async def test_plain_text_client_on_the_implicit_port(relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    c = await RawSMTP.connect(relay.ports["smtps"])
    await c.send(b"EHLO printer.lan\r\n")
    assert await c.closed()
    await c.close()
    [line] = await lines_reach(caplog, 1)
    assert "peer=127.0.0.1" in line and "listener=smtps" in line
    assert "offered=plain text 'EHLO printer.lan'" in line, line
    assert "not TLS" in line, line
    # A plain-text client that waits for a greeting sends nothing; when it gives up, one line too.
    c = await RawSMTP.connect(relay.ports["smtps"])
    await c.close()
    lines = await lines_reach(caplog, 2)
    assert "closed the connection before sending a TLS ClientHello" in lines[1], lines[1]
    assert noise(caplog) == []


async def test_client_that_drops_after_starttls(relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    c = await RawSMTP.connect(relay.ports["lan"])
    await c.reply()
    await c.cmd("EHLO printer.lan")
    assert (await c.cmd("STARTTLS")).startswith("220")
    await c.send(b"GET / HTTP/1.0\r\n\r\n")  # not a ClientHello
    assert await c.closed()
    await c.close()
    [line] = await lines_reach(caplog, 1)
    assert "listener=lan" in line and "STARTTLS" in line and "HTTP_REQUEST" in line, line
    assert "offered=plain text 'GET / HTTP/1.0'" in line, line
    assert noise(caplog) == []


async def test_scan_burst_is_rate_limited_per_peer(
    relay: Relay, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = relay.ports["smtps"]
    burst = 40

    def scan() -> None:
        for _ in range(burst):
            with socket.create_connection(("127.0.0.1", port), timeout=10):
                pass  # connect, close at once: what a port scanner does

    await asyncio.to_thread(scan)
    assert relay.ingress is not None
    failures = relay.ingress.context.tls_failures

    async def all_seen() -> None:
        while failures.seen < burst:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(all_seen(), 30)
    lines = handshake_lines(caplog)
    assert len(lines) == PER_PEER_PER_WINDOW, lines
    assert all("peer=127.0.0.1" in line and "before sending a TLS ClientHello" in line for line in lines)
    # The suppressed ones are summed up in one line when the window ends (the relay's timer calls
    # flush; the test calls it directly), not lost.
    failures.flush()
    summary = handshake_lines(caplog)[-1]
    assert len(handshake_lines(caplog)) == PER_PEER_PER_WINDOW + 1
    assert f"{burst - PER_PEER_PER_WINDOW} more failed TLS handshake(s) not logged" in summary, summary
    assert "127.0.0.1 (35)" in summary, summary
    failures.flush()
    assert len(handshake_lines(caplog)) == PER_PEER_PER_WINDOW + 1  # nothing new to report
    assert noise(caplog) == []

    # A minute later the same peer is logged again.
    clock.advance(WINDOW + 1)
    c = await RawSMTP.connect(port)
    await c.close()
    await lines_reach(caplog, PER_PEER_PER_WINDOW + 2)


async def test_good_clients_still_connect_and_are_not_logged(
    relay: Relay, ca_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    c = await RawSMTP.connect(relay.ports["smtps"], tls=client_context(str(ca_file)))
    assert (await c.reply()).startswith("220")
    assert "250" in await c.cmd("EHLO printer.lan")
    await c.close()
    # Sent right after the handshake, before the greeting: it may reach the relay before the SMTP
    # session has taken the connection over; it is answered after the greeting all the same.
    c = await RawSMTP.connect(relay.ports["smtps"], tls=client_context(str(ca_file)))
    await c.send(b"EHLO early.lan\r\n")
    assert (await c.reply()).startswith("220")
    assert "250" in await c.reply()
    await c.close()
    s = await RawSMTP.connect(relay.ports["lan"])
    await s.reply()
    await s.cmd("EHLO printer.lan")
    await s.starttls(client_context(str(ca_file)))
    assert "250" in await s.cmd("EHLO printer.lan")
    await s.close()
    await asyncio.sleep(0.1)
    assert handshake_lines(caplog) == []
    assert noise(caplog) == []


async def test_client_rejecting_the_relay_certificate(relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    """A device that does not trust the relay's certificate: the line says so (the fix is on the
    device or the certificate, not the relay's TLS settings)."""
    caplog.set_level(logging.INFO)
    # The system CAs only: the test CA is unknown to it, so it sends the unknown_ca alert (RFC 8446 6.2).
    r = await openssl("-connect", f"127.0.0.1:{relay.ports['smtps']}", "-verify_return_error")
    assert r.returncode != 0 and b"verify error" in r.stdout + r.stderr
    [line] = await lines_reach(caplog, 1)
    assert "offered=TLSv1.3" in line and "does not trust the relay's certificate" in line, line


# -- the throttle on its own, with a hand-moved clock ------------------------------------------------
def test_throttle_per_peer_total_and_window() -> None:
    t = HandshakeThrottle(per_peer=2, total=5, window=60.0, max_peers=3)
    assert [t.admit("a", 0.0) for _ in range(4)] == [True, True, False, False]
    assert [t.admit(p, 1.0) for p in ("b", "b", "c")] == [True, True, True]
    assert t.admit("d", 2.0) is False  # 5 lines in this window across all peers
    assert t.take_suppressed() == {"a": 2, "d": 1}
    assert t.take_suppressed() == {}
    assert t.admit("a", 61.0) is True  # a new window for a and for the total
    assert t.admit("e", 61.0) is True
    # The per-peer table stays bounded: stale windows are dropped, fresh ones kept.
    assert len(t.tracked) <= 3


# -- what the client offered, from ClientHellos OpenSSL writes -----------------------------------------
def client_hello(minimum: ssl.TLSVersion, maximum: ssl.TLSVersion) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version, ctx.maximum_version = minimum, maximum
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="relay.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_describe_what_the_client_offered() -> None:
    v = ssl.TLSVersion
    assert describe(client_hello(v.TLSv1, v.TLSv1)) == "TLSv1.0"
    assert describe(client_hello(v.TLSv1, v.TLSv1_1)) == "TLSv1.1"
    assert describe(client_hello(v.TLSv1_2, v.TLSv1_2)) == "TLSv1.2"
    modern = client_hello(v.TLSv1_2, v.TLSv1_3)
    assert describe(modern) == "TLSv1.3"  # from supported_versions, not legacy_version (0x0303)
    assert describe(modern[:60]) == "TLSv1.2"  # cut short: only legacy_version is known
    assert describe(modern[:7]) == "TLS (ClientHello truncated)"
    assert describe(b"EHLO printer.lan\r\n") == "plain text 'EHLO printer.lan'"
    assert describe(b"\x00\xff\x10") == "not TLS (first bytes 00ff10)"
    # An SSL 2.0-format hello as very old clients send it (RFC 5246 E.2): offering TLS 1.0.
    assert describe(b"\x80\x2e\x01\x03\x01" + b"\x00" * 44) == "TLSv1.0 in an SSLv2-format hello"
    assert describe(b"") is None


async def test_silent_client_is_cut_at_the_handshake_timeout(
    server_cert: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Connect to the implicit TLS port and say nothing: cut at the handshake timeout (30 s in the
    relay, short here), one line, and no SMTP session is ever made for it."""
    caplog.set_level(logging.INFO)
    listener = ListenerSettings(name="smtps", tls="implicit")
    sessions: list[asyncio.Protocol] = []

    def session() -> asyncio.Protocol:
        sessions.append(asyncio.Protocol())
        return sessions[-1]

    failures = HandshakeLog()
    server = await asyncio.get_running_loop().create_server(
        lambda: ImplicitTLSAcceptor(
            session=session,
            context=server_context(listener, chains=[server_cert]),
            listener=listener,
            failures=failures,
            timeout=0.3,
        ),
        "127.0.0.1",
        0,
    )
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        assert await asyncio.wait_for(reader.read(), 20) == b""  # the relay closed it
        writer.close()
        [line] = await lines_reach(caplog, 1)
        assert "listener=smtps (implicit TLS) offered=-" in line and "timed out" in line, line
        assert sessions == []
    finally:
        server.close()
        await server.wait_closed()
