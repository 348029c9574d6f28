"""Incremental parsing of the SMTP DATA stream (RFC 5321 section 4.5.2), chunk by chunk.

aiosmtpd 1.4.6 keeps every message whole in memory and accepts bare CR, bare LF and NUL. This parser
works on chunks of any size with C-speed ``bytes`` operations, so memory per session is bounded by
the chunk size, and it closes the smuggling holes:

* end of data is only ``CRLF . CRLF``; ``LF . LF``, ``CR . CR`` and every other variant is data;
* bare CR, bare LF or NUL anywhere makes the whole message invalid (``reject``, the default, answered
  ``550 5.6.11`` once the real end of data arrives) or is rewritten to CRLF (``normalize``, for old
  devices; NUL is removed), so nothing that an upstream could read as a second message survives.

The content it returns is the message in its wire form (``spool/wire.py``): as the device sent it,
dot-stuffed, so the spool keeps it and delivery sends it as it lies. Nothing is copied or rewritten
for a clean message. ``dots`` counts the stuffing dots, so ``len(content) - dots`` is the message's
size (RFC 1870 counts the message, not its wire form). A message the ``normalize`` mode rewrote is
unstuffed and stuffed again (a bare LF before a dot may have made a new line start), so its wire form
never holds a line that is a lone dot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

_END = b"\r\n.\r\n"
_DOT = b"\r\n."
# What a chunk may end with that could still become the end of data, or split a CRLF or a CRLF-dot
# (checked longest first): held back until the next chunk.
_HELD_TAILS = (_END[:4], _END[:3], _END[:2], _END[:1])


@dataclass(slots=True)
class DataResult:
    content: bytes  # message bytes for the spool, in wire form (b"" when the message is invalid)
    leftover: bytes | None  # bytes after the end of data (pipelined commands); None: not finished
    dots: int = 0  # stuffing dots in ``content`` (its message size is ``len(content) - dots``)


class DataParser:
    def __init__(self, *, bare_newlines: Literal["reject", "normalize"] = "reject") -> None:
        self._mode = bare_newlines
        # A virtual CRLF before the first line: "CRLF . CRLF" then also finds an empty message,
        # and "CRLF ." finds a dot at the start of the first line. Then: the held-back tail.
        self._carry = b"\r\n"
        self._first = True
        # Once ``normalize`` has rewritten a segment, every later one is unstuffed and stuffed again:
        self._rewriting = False
        self._line_start = False  # the next input byte starts a line (its stuffing dot not yet seen)
        self._out_start = False  # nothing of the current line has been output yet
        self.invalid: str | None = None
        self.done = False

    def feed(self, chunk: bytes) -> DataResult:
        data = self._carry + chunk if self._carry else chunk
        end = data.find(_END) if b"." in data else -1  # memchr first: most chunks of big mail hold no dot
        if end >= 0:
            self._carry, self.done = b"", True
            segment, leftover = data[: end + 2], data[end + 5 :]
        else:
            keep = next((len(t) for t in _HELD_TAILS if data.endswith(t)), 0)
            self._carry, leftover = (data[len(data) - keep :] if keep else b""), None
            segment = data[: len(data) - keep] if keep else data
        if not segment:
            return DataResult(b"", leftover)
        content, dots = self._segment(segment)
        return DataResult(content, leftover, dots)

    def _segment(self, seg: bytes) -> tuple[bytes, int]:
        # Every CRLF pair accounts for one CR and one LF: no bare CR, bare LF or NUL if and only if
        # the CRs and the LFs each number exactly the pairs (single-byte counts are fast; NUL: memchr).
        pairs = seg.count(b"\r\n")
        if b"\x00" in seg or seg.count(b"\r") != pairs or seg.count(b"\n") != pairs:
            if self._mode == "reject" or self.invalid:
                self.invalid = self.invalid or "bare CR, bare LF or NUL in message data"
                return b"", 0
            # Line ends first, then NUL: a NUL between CR and LF must not join them, or the result
            # would depend on where TCP split the stream.
            seg = seg.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
            seg = seg.replace(b"\x00", b"")
            self._rewriting = True
        if self.invalid:
            return b"", 0
        if self._rewriting:
            return self._restuffed(seg)
        # Clean data goes as it came. (Held tails: a clean segment never ends at a line start, so
        # every dot that starts a line follows a CRLF of its own segment.)
        return self._strip_first(seg), seg.count(_DOT) if b"." in seg else 0

    def _restuffed(self, seg: bytes) -> tuple[bytes, int]:
        """Unstuffed, then stuffed again: a bare LF before a dot may have made a new line start, and
        the wire form must never hold a line that is a lone dot (it would end the data upstream)."""
        if not seg:
            return b"", 0
        line_start, out_start = self._line_start, self._out_start
        plain = seg[1:] if line_start and seg.startswith(b".") else seg
        plain = plain.replace(_DOT, b"\r\n")
        wire = plain.replace(_DOT, b"\r\n..")
        if out_start and wire.startswith(b"."):
            wire = b"." + wire
        self._line_start = seg.endswith(b"\r\n")
        self._out_start = plain.endswith(b"\r\n") if plain else out_start
        return self._strip_first(wire), len(wire) - len(plain)

    def _strip_first(self, seg: bytes) -> bytes:
        if self._first:
            self._first = False
            return seg[2:]  # the virtual CRLF
        return seg
