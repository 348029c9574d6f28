"""Subject and Message-ID, read from the header section while DATA streams past (for the queue view
and the tracking log). Bounded: only the first ``SCAN_LIMIT`` bytes are looked at, and nothing is
kept once the blank line that ends the header section (RFC 5322 2.1) has gone by."""

from __future__ import annotations

import email.header
import re

SCAN_LIMIT = 32 * 1024  # the fields a device writes come first; a header section larger is rare
_FIELD = re.compile(
    rb"^(subject|message-id)[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.IGNORECASE | re.MULTILINE
)
_MAX_TEXT = 998  # RFC 5322 2.1.1: a line is at most 998 characters


def _decode(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    text = " ".join(text.split())  # unfold (RFC 5322 2.2.3)
    if "=?" not in text:  # no encoded words: the common case costs no parser
        return text[:_MAX_TEXT]
    try:
        decoded = str(email.header.make_header(email.header.decode_header(text)))  # RFC 2047 words
    except (ValueError, LookupError):
        decoded = text
    return decoded[:_MAX_TEXT]


class HeaderFacts:
    def __init__(self) -> None:
        self._buf = bytearray()
        self.done = False
        self.subject = ""
        self.message_id = ""

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        if not self._buf:  # the whole header section in the first chunk (most messages): no copy
            end = 0 if data.startswith(b"\r\n") else data.find(b"\r\n\r\n", 0, SCAN_LIMIT)
            if end >= 0:
                self._scan(data[:end])
                return
        self._buf += data[: SCAN_LIMIT - len(self._buf)]
        end = self._buf.find(b"\r\n\r\n")
        if self._buf.startswith(b"\r\n"):
            end = 0
        if end >= 0 or len(self._buf) >= SCAN_LIMIT:
            self.finish(end if end >= 0 else len(self._buf))

    def finish(self, end: int | None = None) -> None:
        if self.done:
            return
        section = bytes(self._buf[: len(self._buf) if end is None else end])
        self._buf = bytearray()
        self._scan(section)

    def _scan(self, section: bytes) -> None:
        self.done = True
        for m in _FIELD.finditer(section):
            name, value = m.group(1).lower(), _decode(m.group(2))
            if name == b"subject" and not self.subject:
                self.subject = value
            elif name == b"message-id" and not self.message_id:
                self.message_id = value.strip().removeprefix("<").removesuffix(">")
