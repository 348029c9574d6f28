"""Command lines as RFC 5321 wants them, before aiosmtpd parses them.

aiosmtpd 1.4.6 reads each command with ``StreamReader.readuntil()``, which ends a line at any LF, so
``MAIL FROM:<a>\\nRCPT TO:<b>\\r\\n`` is two commands, and it decodes arguments with
``surrogateescape``, so bytes that are not UTF-8 reach address checks and the queue. The session's
reader becomes a :class:`CommandReader`, whose ``readuntil`` checks every command line (and every AUTH
response) first:

* a line ends with CRLF only (RFC 5321 2.3.8). A bare LF inside a line follows the listener's
  ``bare_newlines`` setting, as in DATA: ``normalize`` takes it as the line end; ``reject`` refuses
  the line (``500 5.5.2``) and closes the connection, so nothing after the bare LF is ever read as a
  command (sendmail and chasquid also drop the session; waiting for a CRLF instead would leave a client
  that ends every line with LF hanging until the idle timeout);
* a bare CR or NUL inside a line is refused (``500 5.5.2``) in both modes: aiosmtpd never ends a
  line at a bare CR, so the line still ended at CRLF and the session stays in sync;
* a line that is not UTF-8 is refused (``500 5.5.2``): SMTPUTF8 allows UTF-8 only (RFC 6531 3.3).

It also tells the session whether it is idle (waiting for a command), for the 421 on shutdown.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from relay365.errors import CommandRefused
from relay365.ingress.compat import SessionReader, retype

BARE_LF = "500 5.5.2 Bare LF in command line: lines must end with CRLF (RFC 5321 2.3.8); closing connection"
BARE_CR = "500 5.5.2 Bare CR or NUL in command line (RFC 5321 2.3.8)"
NOT_UTF8 = "500 5.5.2 Command line is not valid UTF-8 (RFC 6531 3.3)"
SHUTTING_DOWN = "421 4.3.2 Service shutting down"


class CommandReader(SessionReader):
    """A session's StreamReader with checked command lines; made by :meth:`adopt`."""

    bare_newlines: Literal["reject", "normalize"]
    closing: bool  # shutdown: the next command is answered 421 instead of being read
    finished: bool  # no more lines are read (after a closing refusal or the shutdown 421)
    waiting: bool  # blocked until the client sends a line (the session is idle)
    command: str  # verb of the last command line, for logs

    @classmethod
    def adopt(
        cls, reader: asyncio.StreamReader, *, bare_newlines: Literal["reject", "normalize"]
    ) -> CommandReader:
        """Turn the reader aiosmtpd made into a CommandReader (same object, same buffer)."""
        adopted = retype(reader, cls)
        adopted.bare_newlines = bare_newlines
        adopted.closing = adopted.finished = adopted.waiting = False
        adopted.command = "-"
        return adopted

    async def read_command_line(self) -> bytes:
        line = await self.read_line()
        self.command = _verb(line)
        return line

    async def read_line(self) -> bytes:
        """The next line from the client (a command or an AUTH response), checked."""
        if self.finished:
            await _forever()
        if self.closing:
            self.finished = True
            raise CommandRefused(SHUTTING_DOWN, close=True)
        self.waiting = True
        try:
            line = await self.read_raw_line()
        finally:
            self.waiting = False
        if self.finished:  # the session said goodbye while waiting: the line is not read
            await _forever()
        return self._check(line)

    def _check(self, line: bytes) -> bytes:
        if line.endswith(b"\r\n"):
            text = line[:-2]
        else:
            text = line[:-1]
            if self.bare_newlines == "reject":
                self.finished = True
                self.discard_buffered()  # never read
                raise CommandRefused(BARE_LF, close=True)
            line = text + b"\r\n"
        if b"\r" in text or b"\x00" in text:
            raise CommandRefused(BARE_CR)
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandRefused(NOT_UTF8) from None
        return line

    def say_goodbye(self) -> None:
        """The session closes: any line still to come is never read."""
        self.finished = True


def _verb(line: bytes) -> str:
    verb = line.split(b" ", 1)[0].strip()[:12].upper()
    return verb.decode("ascii") if verb.isalpha() else "?"


async def _forever() -> None:
    """Wait until the session's task is cancelled (the connection is closing)."""
    await asyncio.get_running_loop().create_future()
