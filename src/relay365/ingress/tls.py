"""TLS for device listeners: server contexts per listener and a self-signed certificate on first start.

TLS 1.2 is the minimum by default (as Microsoft requires upstream). A listener marked ``legacy`` may
allow TLS 1.0/1.1 for old printers: OpenSSL 3 refuses those protocol versions at its default security
level, so such a context runs at ``@SECLEVEL=0`` (and only that listener's context).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import warnings
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay365.settings import ListenerSettings

_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}


def self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """Return (cert, key) under ``directory``, generating a self-signed pair the first time."""
    cert_path, key_path = directory / "selfsigned.crt", directory / "selfsigned.key"
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [
        x509.DNSName(hostname),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def server_context(listener: ListenerSettings, *, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if listener.legacy and listener.min_tls_version in ("1.0", "1.1"):
        # Python deprecates TLS 1.0/1.1; a listener marked legacy asks for them on purpose.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = _VERSIONS[listener.min_tls_version]
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    else:
        ctx.minimum_version = _VERSIONS[listener.min_tls_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(cert, key)
    if listener.client_ca_file is not None:
        # Ask for a client certificate but do not require one: a device without a certificate can
        # still be known by IP or AUTH. The CA file may hold CAs or pinned device certificates
        # (partial chains accepted, so a pinned self-signed device certificate works).
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cafile=str(listener.client_ca_file))
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx
