"""Header edits made while DATA streams to the spool: the Received trace field (RFC 5321 4.4) and the
optional sender rewrite (header From replaced by the device's configured mailbox, the original kept
in Reply-To), because Microsoft answers 5.7.60 to a device that sends as someone its login cannot.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable

# A header section larger than this is not buffered for rewriting (Postfix header_size_limit: 100 KB).
HEADER_LIMIT = 256 * 1024


class HeaderTooLarge(Exception):
    """The header section exceeds HEADER_LIMIT while a rewrite needs it whole."""


def received_field(
    *, helo: str, ip: str, hostname: str, protocol: str, queue_id: str, rcpt: str | None
) -> bytes:
    rcpt_part = f"\r\n\tfor <{rcpt}>" if rcpt else ""
    return (
        f"Received: from {helo} ([{ip}])\r\n\tby {hostname} (relay365) with {protocol}"
        f" id {queue_id}{rcpt_part};\r\n\t{email.utils.formatdate(localtime=False)}\r\n"
    ).encode("utf-8", "surrogateescape")


def _fields(section: bytes) -> list[bytes]:
    """Split a header section (without the blank line) into unfolded-preserving raw fields."""
    fields: list[bytes] = []
    for line in section.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        elif line:
            fields.append(line)
    return fields


def rewrite_from(section: bytes, new_from: str) -> bytes:
    """Replace From by ``new_from``; keep the original From as Reply-To unless one exists."""
    fields = _fields(section)
    names = [f.split(b":", 1)[0].strip().lower() for f in fields]
    original = [f.split(b":", 1)[1] for f, n in zip(fields, names, strict=True) if n == b"from"]
    kept = [f for f, n in zip(fields, names, strict=True) if n != b"from"]
    out = [b"From: " + new_from.encode("utf-8")]
    if original and b"reply-to" not in names:
        out.append(b"Reply-To:" + original[0])
    return b"\r\n".join(out + kept) + b"\r\n"


class HeaderEditor:
    """Streams message bytes to ``sink``; buffers only the header section, and only for a rewrite."""

    def __init__(self, sink: Callable[[bytes], None], *, received: bytes, new_from: str | None) -> None:
        self._sink = sink
        self._new_from = new_from
        self._buffer: bytearray | None = bytearray() if new_from else None
        sink(received)

    def write(self, data: bytes) -> None:
        if self._buffer is None:
            self._sink(data)
            return
        self._buffer += data
        if self._buffer.startswith(b"\r\n"):  # no header section at all
            self._release(0)
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end >= 0:
            self._release(end + 2)
        elif len(self._buffer) > HEADER_LIMIT:
            raise HeaderTooLarge

    def _release(self, header_end: int) -> None:
        assert self._buffer is not None and self._new_from is not None
        buf, self._buffer = self._buffer, None
        self._sink(rewrite_from(bytes(buf[:header_end]), self._new_from))
        self._sink(bytes(buf[header_end:]))

    def finish(self) -> None:
        """End of data: a message without a blank line is all header section."""
        if self._buffer is not None:
            self._release(len(self._buffer))
