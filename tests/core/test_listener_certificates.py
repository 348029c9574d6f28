"""Listener certificates (issue 8, item 16): a legacy listener with the default self-signed certificate
serves RSA to printers that only do RSA key exchange, and ECDSA to everyone else; implicit TLS still
identifies devices by client certificate. Real clients: ``openssl s_client`` and Python's ssl."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.support import RawSMTP, RecordingUpstream, client_context, make_settings, running_relay, smarthost

LEGACY = {"name": "legacy", "port": 0, "legacy": True, "min_tls_version": "1.0"}


async def s_client(port: int, *args: str, stdin: bytes) -> subprocess.CompletedProcess[str]:
    """openssl s_client; -ign_eof keeps the session open after stdin ends until the relay closes it
    (after QUIT), so every reply is read. Debian's OpenSSL refuses TLS 1.0 and SHA-1 at its default
    security level: the old printer's side runs at SECLEVEL=0 too."""
    return await asyncio.to_thread(
        subprocess.run,
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-crlf", "-ign_eof", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_rsa_only_tls10_printer_on_default_legacy_listener(
    tmp_path: Path, upstream: RecordingUpstream, mode: str
) -> None:
    settings = make_settings(
        tmp_path, transport=[smarthost(upstream.port)], listener=[{**LEGACY, "tls": mode}]
    )
    async with running_relay(settings) as relay:
        port = relay.ports["legacy"]
        starttls = ["-starttls", "smtp"] if mode == "starttls" else []
        r = await s_client(
            port,
            *starttls,
            "-tls1",
            "-cipher",
            "AES128-SHA@SECLEVEL=0",
            stdin=b"EHLO old-printer.lan\nQUIT\n",
        )
        out = r.stdout.decode(errors="replace")
        assert r.returncode == 0, out + r.stderr.decode(errors="replace")
        assert "Cipher is AES128-SHA" in out and "Protocol  : TLSv1\n" in out, out
        assert "Server public key is 2048 bit" in out, out  # the RSA certificate
        assert "250-relay.test" in out and "250 HELP" in out, out  # EHLO over the TLS 1.0 session
        assert "221" in out, out


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_modern_clients_still_get_ecdsa_on_the_legacy_listener(
    tmp_path: Path, upstream: RecordingUpstream, mode: str
) -> None:
    settings = make_settings(
        tmp_path, transport=[smarthost(upstream.port)], listener=[{**LEGACY, "tls": mode}]
    )
    async with running_relay(settings) as relay:
        port = relay.ports["legacy"]
        for version in ("-tls1_2", "-tls1_3"):
            r = await s_client(
                port,
                *(["-starttls", "smtp"] if mode == "starttls" else []),
                version,
                stdin=b"QUIT\n",
            )
            out = r.stdout.decode(errors="replace")
            assert r.returncode == 0, out
            assert "Server public key is 256 bit" in out, out  # ECDSA P-256
        # Python's own client (TLS 1.3, default settings) sees the ECDSA certificate.
        c = await RawSMTP.connect(port, tls=client_context() if mode == "implicit" else None)
        if mode == "starttls":
            await c.reply()
            await c.cmd("EHLO modern.lan")
            await c.starttls(client_context())
        else:
            await c.reply()
        ssl_obj = c.writer.get_extra_info("ssl_object")
        cert = x509.load_der_x509_certificate(ssl_obj.getpeercert(binary_form=True))
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        await c.close()
    # Both self-signed pairs sit in the spool's tls directory, keys readable by the owner only.
    tls_dir = tmp_path / "spool" / "tls"
    for stem, kind in (("selfsigned", ec.EllipticCurvePublicKey), ("selfsigned-rsa", rsa.RSAPublicKey)):
        pem = x509.load_pem_x509_certificate((tls_dir / f"{stem}.crt").read_bytes())
        assert isinstance(pem.public_key(), kind)
        assert (tls_dir / f"{stem}.key").stat().st_mode & 0o077 == 0


async def test_modern_listener_stays_ecdsa_only(tmp_path: Path, upstream: RecordingUpstream) -> None:
    settings = make_settings(tmp_path, transport=[smarthost(upstream.port)])
    async with running_relay(settings) as relay:
        r = await s_client(relay.ports["lan"], "-starttls", "smtp", stdin=b"QUIT\n")
        assert r.returncode == 0 and "Server public key is 256 bit" in r.stdout.decode()
    assert not (tmp_path / "spool" / "tls" / "selfsigned-rsa.crt").exists()


async def test_client_certificate_over_implicit_tls(
    tmp_path: Path,
    upstream: RecordingUpstream,
    ca: trustme.CA,
    ca_file: Path,
    server_cert: tuple[Path, Path],
) -> None:
    """Implicit TLS hands the finished handshake to the session: the device certificate is seen."""
    leaf = ca.issue_cert("scanner-9.contoso.lan")
    dev_cert, dev_key = tmp_path / "dev.pem", tmp_path / "dev.key"
    leaf.cert_chain_pems[0].write_to_path(str(dev_cert))
    leaf.private_key_pem.write_to_path(str(dev_key))
    fingerprint = x509.load_pem_x509_certificate(dev_cert.read_bytes()).fingerprint(hashes.SHA256()).hex()
    cert, key = server_cert
    settings = make_settings(
        tmp_path,
        transport=[smarthost(upstream.port)],
        listener=[
            {
                "name": "smtps",
                "port": 0,
                "tls": "implicit",
                "cert_file": str(cert),
                "key_file": str(key),
                "client_ca_file": str(ca_file),
                "auth": False,
            }
        ],
        device=[{"name": "by-fp", "client_cert_fingerprints": [fingerprint], "allowed_senders": ["*"]}],
    )
    async with running_relay(settings) as relay:
        ctx = client_context(str(ca_file))
        ctx.load_cert_chain(str(dev_cert), str(dev_key))
        c = await RawSMTP.connect(relay.ports["smtps"], tls=ctx)
        await c.reply()
        await c.cmd("EHLO scanner-9")
        assert (await c.cmd("MAIL FROM:<scan@contoso.com>")).startswith("250")
        await c.close()
        anonymous = await RawSMTP.connect(relay.ports["smtps"], tls=client_context(str(ca_file)))
        await anonymous.reply()
        await anonymous.cmd("EHLO nobody")
        assert (await anonymous.cmd("MAIL FROM:<scan@contoso.com>")).startswith("550 5.7.1")
        await anonymous.close()
