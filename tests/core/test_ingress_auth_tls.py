"""Device identity over TLS: SMTP AUTH (PLAIN/LOGIN, printer dialects, brute force), STARTTLS rules,
implicit TLS, legacy TLS 1.0 listeners and client certificates. Real TLS handshakes on loopback."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import ssl
import subprocess
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay365.credentials import hash_password
from relay365.service.relay import Relay
from tests.support import RawSMTP, RecordingUpstream, client_context, make_settings, running_relay, smarthost

PASSWORD = "Pr1nter-Secret!"
HASH = hash_password(PASSWORD)
AUTH_DEVICE = {"name": "mfp", "username": "mfp-2f", "password_hash": HASH}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
async def relay(
    tmp_path: Path,
    upstream: RecordingUpstream,
    server_cert: tuple[Path, Path],
    request: pytest.FixtureRequest,
) -> AsyncIterator[Relay]:
    marker = request.node.get_closest_marker("relay")
    extra: dict[str, Any] = dict(marker.kwargs) if marker else {}
    cert, key = server_cert
    listeners = extra.pop("listener", [{"name": "lan", "port": 0, "tls": "starttls"}])
    for lst in listeners:
        lst.setdefault("cert_file", str(cert))
        lst.setdefault("key_file", str(key))
    extra.setdefault("device", [AUTH_DEVICE])
    settings = make_settings(tmp_path, transport=[smarthost(upstream.port)], listener=listeners, **extra)
    async with running_relay(settings) as r:
        yield r


async def tls_session(relay: Relay, ca_file: Path, name: str = "lan") -> RawSMTP:
    c = await RawSMTP.connect(relay.ports[name])
    await c.reply()
    ehlo = await c.cmd("EHLO printer.lan")
    assert "STARTTLS" in ehlo and "AUTH" not in ehlo  # AUTH only after TLS
    await c.starttls(client_context(str(ca_file)))
    assert "250-AUTH PLAIN LOGIN" in await c.cmd("EHLO printer.lan")
    return c


async def test_auth_plain_initial_response_and_delivery(
    relay: Relay, ca_file: Path, upstream: RecordingUpstream
) -> None:
    c = await tls_session(relay, ca_file)
    assert (await c.cmd(f"AUTH PLAIN {b64(chr(0) + 'mfp-2f' + chr(0) + PASSWORD)}")).startswith("235 2.7.0")
    assert "AUTH" not in await c.cmd("EHLO printer.lan")
    assert (await c.cmd("MAIL FROM:<scan@contoso.com>")).startswith("250")
    assert (await c.cmd("RCPT TO:<bob@contoso.com>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    assert (await c.cmd(b"Subject: x\r\n\r\nx\r\n.")).startswith("250")
    [msg] = await upstream.wait_for(1)
    assert b"with ESMTPSA id" in msg.content
    await c.close()


async def test_auth_dialects_printers_send(relay: Relay, ca_file: Path) -> None:
    c = await tls_session(relay, ca_file)
    # lowercase command and mechanism, PLAIN without initial response
    assert (await c.cmd("auth plain")).startswith("334")
    assert (await c.cmd(b64("\0MFP-2F\0" + PASSWORD))).startswith("235")
    await c.close()
    c = await tls_session(relay, ca_file)
    assert (await c.cmd("AUTH LOGIN")) == "334 VXNlcm5hbWU6"
    assert (await c.cmd(b64("mfp-2f"))) == "334 UGFzc3dvcmQ6"
    assert (await c.cmd(b64(PASSWORD))).startswith("235")
    await c.close()
    c = await tls_session(relay, ca_file)
    assert (await c.cmd(f"Auth Login {b64('mfp-2f')}")) == "334 UGFzc3dvcmQ6"  # initial-response form
    assert (await c.cmd(b64(PASSWORD))).startswith("235")
    await c.close()
    c = await tls_session(relay, ca_file)
    assert (await c.cmd("AUTH LOGIN")).startswith("334")
    assert (await c.cmd("*")).startswith("501")  # client cancels
    assert (await c.cmd("AUTH PLAIN !!notbase64")).startswith("501 5.5.2")
    assert (await c.cmd("AUTH CRAM-MD5")).startswith("504")
    await c.close()


async def test_auth_refused_in_cleartext(relay: Relay) -> None:
    c = await RawSMTP.connect(relay.ports["lan"])
    await c.reply()
    await c.cmd("EHLO printer.lan")
    assert (await c.cmd(f"AUTH PLAIN {b64(chr(0) + 'mfp-2f' + chr(0) + PASSWORD)}")).startswith("538 5.7.11")
    await c.close()


@pytest.mark.relay(server={"auth_failures_before_block": 5, "auth_block_seconds": 60})
async def test_auth_brute_force_blocks_auth(relay: Relay, ca_file: Path) -> None:
    """20 bad AUTHs on one connection: 535 until the limit, then 454 without trying the password;
    the connection, and new ones from the address, stay open for what does not need AUTH."""
    c = await tls_session(relay, ca_file)
    replies = [await c.cmd(f"AUTH PLAIN {b64(chr(0) + 'mfp-2f' + chr(0) + f'guess{i}')}") for i in range(20)]
    assert replies[:5] == ["535 5.7.8 Authentication credentials invalid"] * 5
    assert all(r.startswith("454 4.7.0 Too many authentication failures") for r in replies[5:])
    # The right password is not even tried while the block lasts.
    assert (await c.cmd(f"AUTH PLAIN {b64(chr(0) + 'mfp-2f' + chr(0) + PASSWORD)}")).startswith("454 4.7.0")
    await c.close()
    again = await tls_session(relay, ca_file)
    assert (await again.cmd(f"AUTH PLAIN {b64(chr(0) + 'mfp-2f' + chr(0) + PASSWORD)}")).startswith("454")
    await again.close()


async def test_unknown_user_costs_the_same(relay: Relay, ca_file: Path) -> None:
    c = await tls_session(relay, ca_file)
    assert (await c.cmd(f"AUTH PLAIN {b64(chr(0) + 'nobody' + chr(0) + 'x')}")).startswith("535 5.7.8")
    await c.close()


@pytest.mark.relay(
    listener=[{"name": "lan", "port": 0, "tls": "starttls-required"}],
    device=[{"name": "local", "ip_allow": ["127.0.0.0/8"]}],
)
async def test_commands_before_required_tls(relay: Relay, ca_file: Path) -> None:
    c = await RawSMTP.connect(relay.ports["lan"])
    await c.reply()
    await c.cmd("EHLO printer.lan")
    assert (await c.cmd("MAIL FROM:<a@contoso.com>")).startswith("530")
    await c.starttls(client_context(str(ca_file)))
    await c.cmd("EHLO printer.lan")
    assert (await c.cmd("MAIL FROM:<a@contoso.com>")).startswith("250")
    await c.close()


@pytest.mark.relay(listener=[{"name": "smtps", "port": 0, "tls": "implicit"}])
async def test_implicit_tls_port_465_style(relay: Relay, ca_file: Path) -> None:
    def client() -> tuple[int, bytes]:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        with smtplib.SMTP_SSL("127.0.0.1", relay.ports["smtps"], context=ctx, timeout=10) as s:
            s.ehlo("printer.lan")
            assert "STARTTLS" not in s.esmtp_features and "auth" in s.esmtp_features
            s.login("mfp-2f", PASSWORD)
            s.mail("scan@contoso.com")
            s.rcpt("bob@contoso.com")
            return s.data(b"Subject: 465\r\n\r\nhi\r\n")

    code, _ = await asyncio.to_thread(client)
    assert code == 250


def tls10_context(ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(ca_file))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


@pytest.mark.relay(
    listener=[
        {"name": "legacy", "port": 0, "tls": "starttls", "legacy": True, "min_tls_version": "1.0"},
        {"name": "modern", "port": 0, "tls": "starttls"},
    ]
)
async def test_tls10_printer_on_legacy_listener_only(relay: Relay, ca_file: Path) -> None:
    c = await RawSMTP.connect(relay.ports["legacy"])
    await c.reply()
    await c.cmd("EHLO old-printer.lan")
    await c.starttls(tls10_context(ca_file))
    ssl_obj = c.writer.get_extra_info("ssl_object")
    assert ssl_obj.version() == "TLSv1"
    assert "AUTH PLAIN LOGIN" in await c.cmd("EHLO old-printer.lan")
    assert (await c.cmd(f"AUTH PLAIN {b64(chr(0) + 'mfp-2f' + chr(0) + PASSWORD)}")).startswith("235")
    await c.close()

    m = await RawSMTP.connect(relay.ports["modern"])
    await m.reply()
    await m.cmd("EHLO old-printer.lan")
    assert (await m.cmd("STARTTLS")).startswith("220")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await m.writer.start_tls(tls10_context(ca_file), server_hostname="localhost")
    await m.close()


async def test_swaks_starttls_auth_pipelining(relay: Relay, ca_file: Path) -> None:
    """A real third-party client: swaks with STARTTLS, AUTH LOGIN and PIPELINING."""
    out = await asyncio.to_thread(
        subprocess.run,
        [
            "swaks",
            "--server",
            f"127.0.0.1:{relay.ports['lan']}",
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            str(ca_file),
            "--auth",
            "LOGIN",
            "--auth-user",
            "mfp-2f",
            "--auth-password",
            PASSWORD,
            "--pipeline",
            "--from",
            "scan@contoso.com",
            "--to",
            "bob@contoso.com",
            "--timeout",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "235 2.7.0 Authentication successful" in out.stdout
    assert "250 2.0.0 Ok: queued as" in out.stdout


@pytest.fixture
def device_cert(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path, str]:
    """A client certificate for a scanner, signed by the test CA: (cert, key, sha256 fingerprint)."""
    from cryptography import x509

    leaf = ca.issue_cert("scanner-1.contoso.lan")
    cert, key = tmp_path / "dev.pem", tmp_path / "dev.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    der = x509.load_pem_x509_certificate(cert.read_bytes()).fingerprint(
        __import__("cryptography.hazmat.primitives.hashes", fromlist=["SHA256"]).SHA256()
    )
    return cert, key, der.hex()


async def test_client_certificate_identifies_device(
    tmp_path: Path,
    upstream: RecordingUpstream,
    server_cert: tuple[Path, Path],
    ca_file: Path,
    device_cert: tuple[Path, Path, str],
) -> None:
    cert, key, fingerprint = device_cert
    settings = make_settings(
        tmp_path,
        transport=[smarthost(upstream.port)],
        listener=[
            {
                "name": "lan",
                "port": 0,
                "tls": "starttls",
                "cert_file": str(server_cert[0]),
                "key_file": str(server_cert[1]),
                "client_ca_file": str(ca_file),
                "auth": False,
            }
        ],
        device=[
            {
                "name": "by-fp",
                "client_cert_fingerprints": [f"sha256:{fingerprint}"],
                "allowed_senders": ["fp@contoso.com"],
            },
            {"name": "by-subject", "client_cert_subjects": ["CN=other.contoso.lan"]},
        ],
    )
    async with running_relay(settings) as relay:
        c = await RawSMTP.connect(relay.ports["lan"])
        await c.reply()
        await c.cmd("EHLO scanner-1")
        assert (await c.cmd("MAIL FROM:<fp@contoso.com>")).startswith("550 5.7.1")  # no cert yet
        ctx = client_context(str(ca_file))
        ctx.load_cert_chain(str(cert), str(key))
        await c.starttls(ctx)
        await c.cmd("EHLO scanner-1")
        assert (await c.cmd("MAIL FROM:<other@contoso.com>")).startswith("550 5.7.1 Device by-fp")
        assert (await c.cmd("MAIL FROM:<fp@contoso.com>")).startswith("250")
        await c.close()
