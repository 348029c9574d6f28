"""The form a message body is spooled in: as it goes on the wire after ``DATA``.

Ingress keeps what the device sent (RFC 5321 4.5.2): CRLF line ends and dot-stuffed lines (a line
that starts with ``.`` has one more), without the ``CRLF . CRLF`` that ends the data (the CRLF before
the dot stays: it ends the last line). An SMTP transport then sends the file as it lies
(``sendfile``) and appends ``.`` CRLF; nothing reads or rewrites the body on the way.

Whoever wants the message itself (RFC 5322 bytes: Graph, the console, a DSN's copy of the headers)
reads it through :func:`unstuff` or an :class:`Unstuffer` for a stream. ``stuff`` makes the wire form
of a message built in memory (a DSN, ``Spool.enqueue``).

Entries spooled by relay365 versions before this form hold the message itself (``QueueEntry.stuffed``
is False): transports stuff those on the way, as they did.
"""

from __future__ import annotations

import re

_BARE_NEWLINE = re.compile(rb"\r\n|\r|\n")


def normalize(message: bytes) -> bytes:
    """Every bare CR and bare LF made a CRLF (what aiosmtplib did to every message it sent)."""
    crlf = message.count(b"\r\n")
    if message.count(b"\r") == crlf and message.count(b"\n") == crlf:
        return message  # the common case: no bare CR or LF, no copy
    return _BARE_NEWLINE.sub(b"\r\n", message)


def stuff(message: bytes) -> bytes:
    """The wire form of ``message``: CRLF line ends and one more dot on every line that starts with
    one (RFC 5321 4.5.2). A missing final CRLF is not added (the sender adds it before the dot)."""
    message = normalize(message)
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..")


def unstuff(wire: bytes) -> bytes:
    """The message from its wire form: the first dot of every line that starts with one removed."""
    if wire.startswith(b"."):
        wire = wire[1:]
    return wire.replace(b"\r\n.", b"\r\n")


class Unstuffer:
    """:func:`unstuff` for a body read in chunks that may split a line anywhere."""

    def __init__(self) -> None:
        self._line_start = True  # the next byte starts a line
        self._cr = False  # the last chunk ended with CR (a CRLF may be split between chunks)

    def feed(self, chunk: bytes) -> bytes:
        head = b""
        if self._cr and chunk.startswith(b"\n"):  # a CRLF split after its CR: a line starts after it
            head, chunk, self._line_start = b"\n", chunk[1:], True
        self._cr = False
        if self._line_start and chunk.startswith(b"."):
            chunk, self._line_start = chunk[1:], False  # the stuffing dot; the next byte is content
        if not chunk:
            return head
        # (from the chunk as read: one ending in "CRLF ." has had that line's stuffing dot removed)
        self._line_start = chunk.endswith(b"\r\n")
        self._cr = chunk.endswith(b"\r")
        out = chunk.replace(b"\r\n.", b"\r\n")
        return head + out if head else out
