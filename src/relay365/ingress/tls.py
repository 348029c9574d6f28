"""TLS for device listeners: server contexts per listener and self-signed certificates on first start.

TLS 1.2 is the minimum by default (as Microsoft requires upstream). A listener marked ``legacy`` may
allow TLS 1.0/1.1 for old printers: OpenSSL 3 refuses those protocol versions at its default security
level, so such a context runs at ``@SECLEVEL=0`` (and only that listener's context).

Without ``cert_file``/``key_file`` a listener serves a self-signed ECDSA P-256 certificate. A legacy
listener serves a self-signed RSA 2048 certificate beside it: printers of the TLS 1.0 era often offer
only RSA key exchange (``AES128-SHA``, RFC 5246 A.5), which needs an RSA certificate, while modern
clients still get ECDSA (OpenSSL keeps one certificate per key type and picks by cipher suite and
signature algorithm).

The contexts are :class:`ListenerTLSContext`: each TLS object it makes keeps a copy of the client's
first record (the ClientHello, at most one record) until the handshake ends, so that a failed
handshake can say what the client offered (``relay365.ingress.handshake``). The hook is the standard
library's own (``SSLContext.sslobject_class`` and ``wrap_bio``), per context, nothing process-wide.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from relay365.ingress.clienthello import SNIFF_LIMIT, describe, hello_length
from relay365.settings import ListenerSettings

_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}
KeyType = Literal["ecdsa", "rsa"]
OFFERED = "relay365_offered"  # attribute a failed handshake's SSLError carries: what the client offered
_FILES: dict[KeyType, str] = {"ecdsa": "selfsigned", "rsa": "selfsigned-rsa"}


def self_signed_paths(directory: Path, key_type: KeyType = "ecdsa") -> tuple[Path, Path]:
    stem = _FILES[key_type]
    return directory / f"{stem}.crt", directory / f"{stem}.key"


def self_signed_types(listener: ListenerSettings) -> tuple[KeyType, ...]:
    """The key types of a listener's default certificates: ECDSA, plus RSA when legacy."""
    return ("ecdsa", "rsa") if listener.legacy else ("ecdsa",)


def self_signed(directory: Path, hostname: str, *, key_type: KeyType = "ecdsa") -> tuple[Path, Path]:
    """Return (cert, key) under ``directory``, generating a self-signed pair the first time."""
    cert_path, key_path = self_signed_paths(directory, key_type)
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    # (imported here: only the first start needs them, and an ingress worker never does; ~6 MB)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
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


def self_signed_chains(directory: Path, hostname: str, listener: ListenerSettings) -> list[tuple[Path, Path]]:
    """The default certificates of a listener without ``cert_file``, made the first time."""
    return [self_signed(directory, hostname, key_type=k) for k in self_signed_types(listener)]


class _SniffingSSLObject(ssl.SSLObject):
    """Copies the bytes of the client's first record before OpenSSL reads them (they are read from the
    incoming memory BIO and written back unchanged, so the handshake sees exactly the same bytes)."""

    _incoming: ssl.MemoryBIO | None = None
    _hello = b""

    def _watch(self, incoming: ssl.MemoryBIO) -> None:
        self._incoming = incoming

    def do_handshake(self) -> None:
        incoming = self._incoming
        if incoming is not None and incoming.pending:
            data = incoming.read()
            incoming.write(data)
            self._hello = (self._hello + data)[:SNIFF_LIMIT]
            need = hello_length(self._hello)
            if need is not None and len(self._hello) >= min(need, SNIFF_LIMIT):
                self._incoming = None  # the first record is complete: stop copying
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as error:
            setattr(error, OFFERED, describe(self._hello))
            raise
        self._incoming, self._hello = None, b""


class ListenerTLSContext(ssl.SSLContext):
    """A server context whose TLS objects remember what the client offered (see the module doc)."""

    sslobject_class = _SniffingSSLObject

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        obj = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        if server_side and isinstance(obj, _SniffingSSLObject):
            obj._watch(incoming)
        return obj


def offered(error: BaseException) -> str | None:
    """What the client offered, when ``error`` is a handshake failure of a listener context."""
    value = getattr(error, OFFERED, None)
    return value if isinstance(value, str) else None


def server_context(listener: ListenerSettings, *, chains: Sequence[tuple[Path, Path]]) -> ssl.SSLContext:
    """The listener's context with each (cert, key) pair loaded (one per key type: ECDSA and RSA)."""
    ctx = ListenerTLSContext(ssl.PROTOCOL_TLS_SERVER)
    if listener.legacy and listener.min_tls_version in ("1.0", "1.1"):
        # Python deprecates TLS 1.0/1.1; a listener marked legacy asks for them on purpose.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = _VERSIONS[listener.min_tls_version]
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    else:
        ctx.minimum_version = _VERSIONS[listener.min_tls_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    for cert, key in chains:
        ctx.load_cert_chain(cert, key)
    if listener.client_ca_file is not None:
        # Ask for a client certificate but do not require one: a device without a certificate can
        # still be known by IP or AUTH. The CA file may hold CAs or pinned device certificates
        # (partial chains accepted, so a pinned self-signed device certificate works).
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cafile=str(listener.client_ca_file))
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx
