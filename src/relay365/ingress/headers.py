"""The header section of a device's message, checked and edited while DATA streams to the spool.

The relay writes the Received trace field (RFC 5321 4.4) in front of every message, and, when the
device's sender is rewritten, replaces header From by the configured mailbox and keeps the original in
Reply-To (Microsoft answers 5.7.60 to a login that sends as someone it may not). While the header
section streams past, it is checked, with memory bounded by the limits themselves:

* a section that starts with a folded (whitespace-led) line is refused: that line continues no field
  of the device's own (RFC 5322 2.2.3 unfolds a continuation into the field before it), so it would
  continue the Received field (or From / Reply-To) that the relay writes just before it. Refusing it
  (550 5.6.0) rather than dropping the line is deliberate: the relay cannot tell what the device meant,
  dropping would silently change the message, and a refused message is not acknowledged, so nothing is
  lost and the device's admin sees why;
* a header line over 998 octets (RFC 5322 2.1.1) is refused (554 5.6.0): Microsoft would refuse it
  later, as an NDR the device never sees (body lines are kept as sent: printers send long lines);
* a header section over the listener's ``max_header_size`` (Exchange Online's limit, 256 KB, by
  default; the relay's own Received counts) is refused (552 5.3.4).

The section is buffered only when the sender is rewritten, and never beyond ``max_header_size``.
The bytes are the message's wire form (dot-stuffed, ``spool/wire.py``); every field the relay writes
starts with a letter or a space, so none needs stuffing.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable

from relay365.errors import MessageRefused

MAX_LINE = 998  # RFC 5322 2.1.1: at most 998 characters per line, excluding the CRLF

FOLDED_FIRST_LINE = (
    "550 5.6.0 Message refused: the header section starts with a folded (whitespace-led) line"
    " that continues no header field (RFC 5322 2.2.3)"
)
LONG_HEADER_LINE = (
    f"554 5.6.0 Message refused: a header line is longer than {MAX_LINE} octets (RFC 5322 2.1.1)"
)


def section_too_large(limit: int) -> str:
    return f"552 5.3.4 Message refused: the header section is larger than {limit} octets"


def received_field(
    *, helo: str, ip: str, hostname: str, protocol: str, queue_id: str, rcpt: str | None
) -> bytes:
    rcpt_part = f"\r\n\tfor <{rcpt}>" if rcpt else ""
    return (
        f"Received: from {helo} ([{ip}])\r\n\tby {hostname} (relay365) with {protocol}"
        f" id {queue_id}{rcpt_part};\r\n\t{email.utils.formatdate(localtime=False)}\r\n"
    ).encode("utf-8", "surrogateescape")


def _fields(section: bytes) -> list[bytes]:
    """Split a header section (checked: it does not start with a continuation) into raw fields,
    each with its own continuation lines."""
    fields: list[bytes] = []
    for line in section.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        elif line:
            fields.append(line)
    return fields


def rewrite_from(section: bytes, new_from: str) -> bytes:
    """Replace every From by ``new_from``; keep the original From as Reply-To unless one exists."""
    fields = _fields(section)
    names = [f.split(b":", 1)[0].strip().lower() for f in fields]
    original = [f.split(b":", 1)[1] for f, n in zip(fields, names, strict=True) if n == b"from"]
    kept = [f for f, n in zip(fields, names, strict=True) if n != b"from"]
    out = [b"From: " + new_from.encode("utf-8")]
    if original and b"reply-to" not in names:
        out.append(b"Reply-To:" + original[0])
    return b"\r\n".join(out + kept) + b"\r\n"


class HeaderEditor:
    """Streams message bytes to ``sink`` after the Received field. Raises ``MessageRefused`` (once)
    when the header section breaks a rule; the caller then stops writing and refuses at "."."""

    def __init__(
        self, sink: Callable[[bytes], None], *, received: bytes, new_from: str | None, max_size: int
    ) -> None:
        self._sink = sink
        self._new_from = new_from
        self._max_size = max_size
        self._size = len(received)  # the whole section as it leaves: the relay's field counts too
        self._partial = bytearray()  # the current, unfinished header line (at most MAX_LINE + 2)
        self._section: bytearray | None = bytearray() if new_from else None
        self._in_header = True
        self._first = True
        sink(received)

    def write(self, data: bytes) -> None:
        if not self._in_header:
            self._sink(data)
            return
        end = self._scan(data)  # offset just past the blank line that ends the section, or -1
        head = data if end < 0 else data[:end]
        if self._section is None:
            self._sink(data)  # nothing to rewrite: the section has been checked and goes as it is
            return
        self._section += head
        if end >= 0:
            self._release()
            self._sink(data[end:])

    def _scan(self, data: bytes) -> int:
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._partial += data[pos:]
                if len(self._partial) > MAX_LINE + 1:  # + a CR whose LF has not arrived yet
                    raise MessageRefused(LONG_HEADER_LINE)
                self._count(len(data) - pos)
                return -1
            line_len = len(self._partial) + nl + 1 - pos  # with its CRLF
            first_byte = bytes(self._partial[:1]) or data[pos : pos + 1]
            self._partial.clear()
            self._count(nl + 1 - pos)  # the partial line's bytes were counted as they came
            pos = nl + 1
            if line_len == 2:  # the empty line: the header section ends here
                self._in_header = False
                return pos
            if self._first and first_byte in (b" ", b"\t"):
                raise MessageRefused(FOLDED_FIRST_LINE)
            self._first = False
            if line_len - 2 - (first_byte == b".") > MAX_LINE:  # (wire form: a dot stuffed in front)
                raise MessageRefused(LONG_HEADER_LINE)
        return -1

    def _count(self, n: int) -> None:
        self._size += n
        if self._size > self._max_size:
            raise MessageRefused(section_too_large(self._max_size))

    def _release(self) -> None:
        assert self._section is not None and self._new_from is not None
        section, self._section = bytes(self._section), None
        blank = b"" if self._in_header else b"\r\n"  # the empty line that ended the section
        self._sink(rewrite_from(section[: len(section) - len(blank)], self._new_from) + blank)

    def finish(self) -> None:
        """End of data: a message without a blank line is all header section."""
        if self._partial and self._first and bytes(self._partial[:1]) in (b" ", b"\t"):
            raise MessageRefused(FOLDED_FIRST_LINE)
        if self._section is not None:
            self._release()
