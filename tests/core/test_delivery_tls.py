"""The smart host transport's TLS rules: STARTTLS required, stripped STARTTLS, credentials never in
clear, certificate verification on by default (self-signed, wrong name), a verified TLS delivery."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay365.ingress.tls import self_signed
from relay365.spool.model import RcptState
from tests.support import (
    Clock,
    RecordingUpstream,
    make_settings,
    running_relay,
    send_message,
    smarthost,
    wait_state,
)

PASSWORD = "Sm4rthost-pw-0917"
USER = "relay@contoso.com"
NO_TLS = [{"name": "lan", "port": 0, "tls": "none"}]


class StrippedUpstream:
    """A real SMTP peer on a socket that offers AUTH but no STARTTLS (a STARTTLS-stripping attacker),
    and records every byte the client sends."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> StrippedUpstream:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mitm.test ESMTP\r\n")
        try:
            while line := await asyncio.wait_for(reader.readline(), 10):
                self.received += line
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-mitm.test\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n")
                elif verb == b"AUTH":
                    writer.write(b"235 2.7.0 Authentication successful\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    break
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    while (data := await reader.readline()) not in (b".\r\n", b""):
                        self.received += data
                    writer.write(b"250 2.0.0 Ok: stolen\r\n")
                else:
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def tls_settings(tmp_path: Path, port: int, **transport: Any) -> Any:
    return make_settings(tmp_path, listener=NO_TLS, transport=[smarthost(port, **transport)])


async def test_starttls_required_but_not_offered_defers(tmp_path: Path, upstream: RecordingUpstream) -> None:
    async with running_relay(tls_settings(tmp_path, upstream.port, tls="required"), clock=Clock()) as relay:
        qid = await asyncio.to_thread(send_message, relay.ports["lan"])
        entry = await wait_state(relay.spool, qid, "alice@contoso.com", RcptState.DEFERRED)
    assert "STARTTLS" in entry.recipients[0].last_reply and entry.recipients[0].last_reply.startswith("451")
    assert upstream.messages == []


@pytest.mark.parametrize("tls", ["required", "opportunistic"])
async def test_password_never_sent_in_clear(
    tmp_path: Path, tls: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("RELAY365_TEST_SMARTHOST_PW", PASSWORD)
    mitm = await StrippedUpstream().start()
    try:
        settings = tls_settings(
            tmp_path, mitm.port, tls=tls, username=USER, password_env="RELAY365_TEST_SMARTHOST_PW"
        )
        with caplog.at_level(logging.INFO):
            async with running_relay(settings, clock=Clock()) as relay:
                qid = await asyncio.to_thread(send_message, relay.ports["lan"])
                entry = await wait_state(relay.spool, qid, "alice@contoso.com", RcptState.DEFERRED)
    finally:
        await mitm.stop()
    reply = entry.recipients[0].last_reply
    assert reply.startswith(("451", "454")), reply
    assert b"EHLO" in mitm.received  # the peer was reached...
    assert b"AUTH" not in mitm.received.upper() and b"MAIL FROM" not in mitm.received.upper()
    for secret in (PASSWORD.encode(), base64.b64encode(PASSWORD.encode()),
                   base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())):  # fmt: skip
        assert secret not in mitm.received
        assert secret.decode() not in caplog.text
    if tls == "opportunistic":
        assert "refusing to send credentials" in reply
        assert "ALERT up" in caplog.text


async def test_self_signed_upstream_refused_by_default(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path / "up-tls", "localhost")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    up = await RecordingUpstream(tls_context=ctx, require_starttls=True).start()
    try:
        async with running_relay(tls_settings(tmp_path, up.port, tls="required"), clock=Clock()) as relay:
            qid = await asyncio.to_thread(send_message, relay.ports["lan"])
            entry = await wait_state(relay.spool, qid, "alice@contoso.com", RcptState.DEFERRED)
        assert "CERTIFICATE_VERIFY_FAILED" in entry.recipients[0].last_reply
        assert up.messages == []
        # The admin may opt out explicitly (verify = false): then it is delivered over TLS.
        async with running_relay(
            tls_settings(tmp_path / "b", up.port, tls="required", verify=False), clock=Clock()
        ) as relay:
            await asyncio.to_thread(send_message, relay.ports["lan"])
            [msg] = await up.wait_for(1)
        assert msg.tls
    finally:
        await up.stop()


async def test_verified_tls_and_wrong_name(tmp_path: Path, ca: trustme.CA, ca_file: Path) -> None:
    good = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(good)
    wrong = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("other.test").configure_cert(wrong)
    up_good = await RecordingUpstream(tls_context=good, require_starttls=True).start()
    up_wrong = await RecordingUpstream(tls_context=wrong, require_starttls=True).start()
    try:
        settings = tls_settings(tmp_path, up_good.port, tls="required", ca_file=str(ca_file))
        async with running_relay(settings, clock=Clock()) as relay:
            await asyncio.to_thread(send_message, relay.ports["lan"])
            [msg] = await up_good.wait_for(1)
        assert msg.tls
        settings = tls_settings(tmp_path / "b", up_wrong.port, tls="required", ca_file=str(ca_file))
        async with running_relay(settings, clock=Clock()) as relay:
            qid = await asyncio.to_thread(send_message, relay.ports["lan"])
            entry = await wait_state(relay.spool, qid, "alice@contoso.com", RcptState.DEFERRED)
        assert "CERTIFICATE_VERIFY_FAILED" in entry.recipients[0].last_reply
        assert "127.0.0.1" in entry.recipients[0].last_reply  # the name that did not match
        assert up_wrong.messages == []
    finally:
        await up_good.stop()
        await up_wrong.stop()
