"""Incremental parsing of the SMTP DATA stream (RFC 5321 section 4.5.2), chunk by chunk.

aiosmtpd 1.4.6 keeps every message whole in memory and accepts bare CR, bare LF and NUL. This parser
works on chunks of any size with C-speed ``bytes`` operations, so memory per session is bounded by
the chunk size, and it closes the smuggling holes:

* end of data is only ``CRLF . CRLF``; ``LF . LF``, ``CR . CR`` and every other variant is data;
* bare CR, bare LF or NUL anywhere makes the whole message invalid (``reject``, the default, answered
  ``550 5.6.11`` once the real end of data arrives) or is rewritten to CRLF (``normalize``, for old
  devices; NUL is removed), so nothing that an upstream could read as a second message survives;
* a leading dot is removed from every line (dot-unstuffing, RFC 5321 section 4.5.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

_END = b"\r\n.\r\n"
_DOT = b"\r\n."


@dataclass(slots=True)
class DataResult:
    content: bytes  # unstuffed message bytes for the spool (b"" when the message is invalid)
    leftover: bytes | None  # bytes after the end of data (pipelined commands); None: not finished


class DataParser:
    def __init__(self, *, bare_newlines: Literal["reject", "normalize"] = "reject") -> None:
        self._mode = bare_newlines
        # A virtual CRLF before the first line: "CRLF . CRLF" then also finds an empty message,
        # and "CRLF ." finds a dot at the start of the first line.
        self._buf = bytearray(b"\r\n")
        self._first = True
        self._line_start = False
        self.invalid: str | None = None
        self.done = False

    def feed(self, chunk: bytes) -> DataResult:
        buf = self._buf
        buf += chunk
        # One scan finds both the end of data and whether any line needs dot-unstuffing: every
        # "CRLF ." is either the terminator (followed by CRLF) or a stuffed dot.
        end, stuffed = -1, False
        pos = buf.find(_DOT)
        while pos != -1:
            if buf[pos + 3 : pos + 5] == b"\r\n":
                end = pos
                break
            stuffed = True
            pos = buf.find(_DOT, pos + 3)
        if end >= 0:
            segment, leftover = bytes(memoryview(buf)[: end + 2]), bytes(memoryview(buf)[end + 5 :])
            self._buf = bytearray()
            self.done = True
        else:
            # Keep back what could still become "CRLF . CRLF" or "CRLF ." or a CRLF pair, so that
            # no pattern is ever split between two segments.
            last = buf.rfind(b"\r\n")
            if last != -1 and len(buf) - last < len(_END):
                cut = last
            elif buf.endswith(b"\r"):
                cut = len(buf) - 1
            else:
                cut = len(buf)
            segment, leftover = bytes(memoryview(buf)[:cut]), None
            del buf[:cut]
        return DataResult(self._segment(segment, stuffed), leftover)

    def _segment(self, seg: bytes, stuffed: bool) -> bytes:
        if not seg:
            return seg
        # Every CRLF pair accounts for one CR and one LF, so the CR, LF and NUL bytes number exactly
        # twice the pairs if and only if there is no bare CR, bare LF or NUL (two scans, not four).
        if len(seg) - len(seg.translate(None, b"\r\n\x00")) != 2 * seg.count(b"\r\n"):
            if self._mode == "reject" or self.invalid:
                self.invalid = self.invalid or "bare CR, bare LF or NUL in message data"
                return b""
            # Line ends first, then NUL: a NUL between CR and LF must not join them, or the result
            # would depend on where TCP split the stream.
            seg = seg.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
            seg = seg.replace(b"\x00", b"")
            stuffed = True  # normalising may have made new "CRLF ." line starts
            if not seg:
                return seg
        if self.invalid:
            return b""
        # Segments of clean data never end at a line start; normalised ones may (a bare LF, NULs).
        if self._line_start and seg.startswith(b"."):
            seg = seg[1:]
        self._line_start = seg.endswith(b"\r\n")
        if stuffed:
            seg = seg.replace(_DOT, b"\r\n")
        if self._first and seg:
            self._first = False
            seg = seg[2:]
        return seg
