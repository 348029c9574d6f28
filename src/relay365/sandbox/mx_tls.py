"""TLS for the MX endpoint: ask for a client certificate, never fail the handshake over it.

Exchange Online's MX endpoint takes STARTTLS from anyone and asks for a client certificate; a
certificate it cannot trust does not break the connection: the session goes on and the connector
lookup fails later, so relaying is refused with ``550 5.7.64 TenantAttribution; Relay Access Denied``
(https://learn.microsoft.com/exchange/troubleshoot/email-delivery/ndr/relay-access-denied-smtp;
KB 3212877, https://support.microsoft.com/help/3212877: a chain that ends in an untrusted root).

The stdlib ``ssl`` module cannot do this: with ``CERT_OPTIONAL`` OpenSSL verifies any certificate the
client sends and aborts the handshake when it is untrusted, and Python exposes no verify callback
(``CERT_NONE`` does not ask for a certificate at all). pyOpenSSL does: its verify callback accepts
every certificate, and the chain's verdict is kept for the session to read.

:class:`LenientClientCertContext` is handed to asyncio's ``SSLProtocol`` where an ``ssl.SSLContext``
goes; it implements what ``sslproto`` uses (``wrap_bio`` and the returned object's ``do_handshake``,
``read``, ``write``, ``unwrap``, ``getpeercert``, ``cipher``, ``compression``), mapping pyOpenSSL's
errors to the stdlib's. Everything pyOpenSSL-specific stays in this module.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

__all__ = ["ClientCertificate", "LenientClientCertContext"]

# OpenSSL's X509_V_ERR_* codes (x509_vfy.h) that a device's certificate typically hits.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate (incomplete chain or untrusted root)",
    21: "unable to verify the first certificate",
    26: "unsupported certificate purpose",
}


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """The certificate a client presented: its DNS names (SAN, then subject CN) and the verdict."""

    names: tuple[str, ...]
    subject: str
    trusted: bool
    problem: str = ""


class _Verdict:
    """The first verification error of one connection (the callback runs per certificate)."""

    def __init__(self) -> None:
        self.error: tuple[int, int] | None = None  # (errno, depth)


def _accept_any(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    verdict = conn.get_app_data()
    if not ok and isinstance(verdict, _Verdict) and verdict.error is None:
        verdict.error = (errno, depth)
    return True  # never abort the handshake: the SMTP session decides (5.7.64)


class LenientClientCertContext:
    """What asyncio's sslproto needs of an ``ssl.SSLContext``, for a server that asks for a client
    certificate and accepts any. ``verify_mode``/``check_hostname`` are read by aiosmtpd."""

    verify_mode = ssl.CERT_OPTIONAL
    check_hostname = False

    def __init__(self, *, cert_chain: Path, key: Path, trusted_cas: Sequence[Path]) -> None:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)  # Exchange Online: TLS 1.2 or later
        context.use_certificate_chain_file(str(cert_chain))
        context.use_privatekey_file(str(key))
        for ca in trusted_cas:
            context.load_verify_locations(str(ca))
            context.load_client_ca(str(ca).encode())
        context.set_verify(SSL.VERIFY_PEER, _accept_any)  # ask; FAIL_IF_NO_PEER_CERT is not set
        self._context = context

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: Any = None,
    ) -> LenientSSLObject:
        if not server_side:
            raise ValueError("the lenient context is for the server side only")
        verdict = _Verdict()
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(verdict)
        connection.set_accept_state()
        return LenientSSLObject(connection, incoming, outgoing, verdict)


class LenientSSLObject:
    """A pyOpenSSL connection over asyncio's memory BIOs, with ``ssl.SSLObject``'s behaviour."""

    def __init__(
        self, connection: SSL.Connection, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, verdict: _Verdict
    ) -> None:
        self._conn = connection
        self._incoming = incoming
        self._outgoing = outgoing
        self._verdict = verdict

    # -- moving bytes between the BIOs ----------------------------------------------------------

    def _feed(self) -> None:
        data = self._incoming.read()
        if data:
            self._conn.bio_write(data)

    def _flush(self) -> None:
        while True:
            try:
                data = self._conn.bio_read(65536)
            except SSL.WantReadError:
                return
            if not data:
                return
            self._outgoing.write(data)

    def _call(self, operation: Any, *args: Any) -> Any:
        self._feed()
        try:
            return operation(*args)
        except SSL.WantReadError:
            raise ssl.SSLWantReadError("The operation did not complete (read)") from None
        except SSL.WantWriteError:
            raise ssl.SSLWantWriteError("The operation did not complete (write)") from None
        except SSL.ZeroReturnError:
            raise
        except SSL.SysCallError as exc:
            raise ssl.SSLEOFError(f"EOF occurred in violation of protocol: {exc}") from exc
        except SSL.Error as exc:
            raise ssl.SSLError(f"TLS error: {exc}") from exc
        finally:
            self._flush()

    # -- what sslproto calls --------------------------------------------------------------------

    def do_handshake(self) -> None:
        self._call(self._conn.do_handshake)

    def read(self, size: int = 1024, buffer: Any = None) -> Any:
        try:
            data: bytes = self._call(self._conn.recv, size)
        except SSL.ZeroReturnError:
            data = b""  # close_notify: the stdlib returns empty data
        if buffer is None:
            return data
        buffer[: len(data)] = data
        return len(data)

    def write(self, data: bytes) -> int:
        return int(self._call(self._conn.send, bytes(data)))

    def unwrap(self) -> None:
        """Send close_notify; the peer's answer is not awaited (the transport closes next)."""
        with contextlib.suppress(ssl.SSLError, SSL.ZeroReturnError):
            self._call(self._conn.shutdown)

    def getpeercert(self, binary_form: bool = False) -> Any:
        """The stdlib's form of the client certificate, only when it is trusted (as ``ssl``)."""
        cert = self._conn.get_peer_certificate()
        if cert is None:
            return None
        if binary_form:
            return crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
        info = self.client_certificate()
        if info is None or not info.trusted:
            return {}
        return {
            "subject": tuple((("commonName", name),) for name in _common_names(cert.to_cryptography())),
            "subjectAltName": tuple(("DNS", name) for name in _dns_names(cert.to_cryptography())),
        }

    def cipher(self) -> tuple[str, str, int] | None:
        name = self._conn.get_cipher_name()
        if name is None:
            return None
        return name, self._conn.get_cipher_version() or "", self._conn.get_cipher_bits() or 0

    def compression(self) -> None:
        return None

    def version(self) -> str | None:
        return self._conn.get_protocol_version_name()

    # -- what the MX session reads --------------------------------------------------------------

    def client_certificate(self) -> ClientCertificate | None:
        """The presented certificate and whether its chain ends at a trusted CA (None: none sent)."""
        cert = self._conn.get_peer_certificate()
        if cert is None:
            return None
        parsed = cert.to_cryptography()
        names = tuple(dict.fromkeys([*_dns_names(parsed), *_common_names(parsed)]))
        subject = parsed.subject.rfc4514_string()
        if self._verdict.error is None:
            return ClientCertificate(names=names, subject=subject, trusted=True)
        errno, depth = self._verdict.error
        problem = f"{_VERIFY_ERRORS.get(errno, f'X509 verify error {errno}')} (depth {depth})"
        return ClientCertificate(names=names, subject=subject, trusted=False, problem=problem)


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name).lower() for name in san.get_values_for_type(x509.DNSName)]


def _common_names(cert: x509.Certificate) -> list[str]:
    return [str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
