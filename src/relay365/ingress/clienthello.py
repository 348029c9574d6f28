"""What a client offered in its first bytes on a TLS port, for the log line of a failed handshake.

Reads as much of the TLS record header and the ClientHello as the bytes hold (RFC 8446 5.1 record
layer, 4.1.2 ClientHello; RFC 5246 7.4.1.2 for TLS 1.0-1.2). The highest version offered comes from
the ``supported_versions`` extension (RFC 8446 4.2.1) when the client sends it, otherwise from
``legacy_version`` (``client_version``). GREASE values (RFC 8701) are ignored. An SSL 2.0-format hello
(RFC 5246 appendix E.2) and plain text are named as such, so an admin can tell an old printer, a
plain-text client on the implicit TLS port and a scanner apart.
"""

from __future__ import annotations

# One TLS record at most (RFC 8446 5.1: a record holds at most 2^14 octets plus its 5-octet header).
SNIFF_LIMIT = 5 + (1 << 14)
_HANDSHAKE = 0x16  # ContentType handshake (RFC 8446 5.1)
_CLIENT_HELLO = 0x01  # HandshakeType client_hello (RFC 8446 4)
_SUPPORTED_VERSIONS = 0x002B  # RFC 8446 4.2
_VERSIONS = {
    0x0002: "SSLv2",
    0x0300: "SSLv3",
    0x0301: "TLSv1.0",
    0x0302: "TLSv1.1",
    0x0303: "TLSv1.2",
    0x0304: "TLSv1.3",
}


def version_name(version: int) -> str:
    return _VERSIONS.get(version, f"unknown version 0x{version:04x}")


def _grease(value: int) -> bool:
    """RFC 8701 2: 0x0A0A, 0x1A1A, ... 0xFAFA."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


def hello_length(data: bytes) -> int | None:
    """How many bytes the first TLS record needs, once its header has arrived (None: not known yet,
    0: the bytes are not a TLS handshake record, nothing more to wait for)."""
    if not data:
        return None
    if data[0] != _HANDSHAKE:
        return 0
    if len(data) < 5:
        return None
    return 5 + int.from_bytes(data[3:5], "big")


def describe(data: bytes) -> str | None:
    """``TLSv1.0``, ``TLSv1.3``, ``TLSv1.0 in an SSLv2-format hello``, ``plain text 'EHLO x'``, ...;
    None when the client sent nothing."""
    if not data:
        return None
    if data[0] == _HANDSHAKE and len(data) >= 2 and data[1] == 0x03:
        return _client_hello(data)
    if data[0] & 0x80 and len(data) >= 5 and data[2] == _CLIENT_HELLO:
        # SSL 2.0 record header (2 octets) then msg_type 1 and the highest version offered.
        return f"{version_name(int.from_bytes(data[3:5], 'big'))} in an SSLv2-format hello"
    first_line = data.split(b"\n", 1)[0].rstrip(b"\r")[:40]
    if first_line and all(0x20 <= b < 0x7F for b in first_line):
        return f"plain text {first_line.decode('ascii')!r}"
    return f"not TLS (first bytes {data[:8].hex()})"


def _client_hello(data: bytes) -> str:
    body = data[5:]
    if not body:
        return "TLS (ClientHello not received)"
    if body[0] != _CLIENT_HELLO:
        return f"TLS handshake message type {body[0]} instead of a ClientHello"
    try:
        return version_name(max(_offered_versions(body)))
    except IndexError:
        return "TLS (ClientHello truncated)"


def _offered_versions(body: bytes) -> list[int]:
    """The versions a ClientHello offers; IndexError when it stops before ``legacy_version``."""

    def u16(at: int) -> int:
        if at + 2 > len(body):
            raise IndexError(at)
        return int.from_bytes(body[at : at + 2], "big")

    legacy = u16(4)  # msg_type (1) + length (3), then legacy_version
    try:
        at = 6 + 32  # random
        at += 1 + body[at]  # legacy_session_id
        at += 2 + u16(at)  # cipher_suites
        at += 1 + body[at]  # legacy_compression_methods
        end = min(len(body), at + 2 + u16(at))
        at += 2
        while at + 4 <= end:
            ext_type, ext_len = u16(at), u16(at + 2)
            if ext_type == _SUPPORTED_VERSIONS:
                listed = body[at + 5 : at + 5 + body[at + 4]]
                versions = [int.from_bytes(listed[i : i + 2], "big") for i in range(0, len(listed) - 1, 2)]
                versions = [v for v in versions if not _grease(v)]
                if versions:
                    return versions
            at += 4 + ext_len
    except IndexError:
        pass  # a ClientHello cut short: legacy_version is still known
    return [legacy]
