"""One mail transaction on an upstream session, with the body sent as it lies in the spool.

aiosmtplib sets the session up and keeps it (connect, EHLO, STARTTLS, AUTH, RSET, QUIT). The mail
transaction itself is written here, for two reasons aiosmtplib cannot serve:

* its ``data()`` takes the message in memory and rewrites it with regular expressions (line ends,
  then dot-stuffing), about 11 ms of CPU per MB and two copies; the spool already keeps the wire
  form (``spool/wire.py``), so the body goes from the file to the socket untouched: ``sendfile`` on
  a plain connection, large writes on TLS;
* its protocol reads one reply per command, so commands cannot be pipelined. With PIPELINING offered
  (RFC 2920), MAIL, every RCPT and DATA leave in one write and their replies are read in order: one
  round trip to the upstream before the body instead of two or more.

For the transaction, :class:`_Replies` becomes the transport's protocol (``set_protocol``, public
asyncio API; ``loop.sendfile`` does the same); aiosmtplib's protocol is put back afterwards, also
after an error, and is told if the connection was lost meanwhile. Failures are raised as aiosmtplib's
own exceptions, so ``smtp_client.send_over`` maps them to delivery outcomes in one place.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib import SMTPResponse
from aiosmtplib.email import quote_address

from relay365.spool.model import BodyReader, BodySource
from relay365.spool.wire import stuff

MAX_REPLY = 32 * 1024  # aiosmtplib's bound on one reply (MAX_RESPONSE_LENGTH) and ours
CHUNK = 256 * 1024  # body reads for TLS and for spools without files
MIN_RATE = 100_000  # bytes/s an upstream must take the body at, at least (on top of the timeout)
CLOSING = 421  # RFC 5321 3.8: the server closes the session after this reply
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # CR, LF, NUL in a command would inject another one


@dataclass
class Progress:
    """How far the transaction got (``send_over`` words a lost connection by it)."""

    data_started: bool = False


@dataclass
class Sent:
    refused: dict[str, SMTPResponse] = field(default_factory=dict)  # recipients refused at RCPT
    reply: SMTPResponse | None = None  # the reply to the data; None when no recipient was accepted


class _Replies(asyncio.Protocol):
    """Reads every reply the server sends (several at once when pipelined) into a queue."""

    def __init__(self, previous: asyncio.BaseProtocol) -> None:
        self.previous = previous
        self._buf = bytearray()
        self._replies: collections.deque[SMTPResponse] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._paused = False
        self.error: Exception | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._buf += data
        while (reply := self._parse()) is not None:
            self._replies.append(reply)
        if len(self._buf) > MAX_REPLY:
            self._fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))
        self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)
        self.previous.connection_lost(exc)  # aiosmtplib's session learns it too

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- reading -----------------------------------------------------------------------------------
    def _parse(self) -> SMTPResponse | None:
        """One complete reply off the buffer (RFC 5321 4.2: ``code-text`` lines, then ``code text``)."""
        lines, offset = [], 0
        while (end := self._buf.find(b"\n", offset)) >= 0:
            line = bytes(self._buf[offset : end + 1])
            offset = end + 1
            if len(line) < 4 or not line[:3].isdigit():
                self._fail(aiosmtplib.SMTPResponseException(-1, f"Malformed SMTP response line: {line!r}"))
                return None
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del self._buf[:offset]
                text = b"\n".join(lines).decode("utf-8", "surrogateescape")
                return SMTPResponse(int(line[:3]), text)
        return None

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def reply(self, wait: float) -> SMTPResponse:
        """The next reply, waiting up to ``wait`` seconds for it."""
        if not self._replies:
            try:
                async with asyncio.timeout(wait):
                    while not self._replies:
                        if self.error is not None:
                            raise self.error
                        self._waiter = asyncio.get_running_loop().create_future()
                        try:
                            await self._waiter
                        finally:
                            self._waiter = None
            except TimeoutError:
                raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from None
        return self._replies.popleft()

    async def drain(self) -> None:
        if self.error is not None:
            raise self.error
        if self._paused:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained


def _command(*parts: str, encoding: str) -> bytes:
    line = " ".join(parts)
    if _CONTROL.search(line):
        raise ValueError("Command arg contains a prohibited control character")
    return line.encode(encoding) + b"\r\n"


async def transaction(
    smtp: aiosmtplib.SMTP,
    *,
    mail_from: str,
    rcpts: tuple[str, ...],
    options: list[str],
    body: BodySource,
    progress: Progress,
) -> Sent:
    """MAIL, RCPT for each recipient, DATA and the body on ``smtp`` (connected, EHLO done).

    Returns the recipients refused at RCPT and the reply to the data (None when every recipient was
    refused: nothing was sent). Raises ``SMTPSenderRefused`` (MAIL), ``SMTPDataError`` (DATA or the
    data refused), ``SMTPServerDisconnected`` and ``SMTPTimeoutError`` like aiosmtplib does."""
    transport = smtp.transport
    if not isinstance(transport, asyncio.WriteTransport) or transport.is_closing() or smtp.protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
    mail = _command(f"MAIL FROM:{quote_address(mail_from)}", *options, encoding=encoding)
    rcpt_lines = [_command(f"RCPT TO:{quote_address(r)}", encoding=encoding) for r in rcpts]
    timeout = float(smtp.timeout or 60.0)
    replies = _Replies(smtp.protocol)
    transport.set_protocol(replies)
    try:
        return await _exchange(
            transport, replies, mail_from, rcpts, [mail, *rcpt_lines], body, progress, timeout,
            pipelined=smtp.supports_extension("pipelining"),
        )  # fmt: skip
    finally:
        if not transport.is_closing():
            transport.set_protocol(replies.previous)


async def _exchange(
    transport: asyncio.WriteTransport,
    replies: _Replies,
    mail_from: str,
    rcpts: tuple[str, ...],
    envelope: list[bytes],
    body: BodySource,
    progress: Progress,
    wait: float,
    *,
    pipelined: bool,
) -> Sent:
    outcome = Sent()
    if pipelined:  # RFC 2920 3.1: the replies come in the order of the commands
        transport.write(b"".join([*envelope, b"DATA\r\n"]))
    for i, line in enumerate(envelope):
        if not pipelined:
            transport.write(line)
        reply = await replies.reply(wait)
        if reply.code == CLOSING:  # RFC 5321 3.8: no reply follows; the rest fails the same way
            transport.close()
            if i == 0:
                raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, mail_from)
            outcome.refused.update((r, reply) for r in rcpts[i - 1 :])
            return outcome
        if i == 0 and reply.code != 250:
            if pipelined:  # the RCPTs and DATA were sent too: their replies must be read
                for _ in range(len(envelope)):
                    await replies.reply(wait)
            raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, mail_from)
        if i > 0 and reply.code not in (250, 251):
            outcome.refused[rcpts[i - 1]] = reply
    if not pipelined and len(outcome.refused) < len(rcpts):
        transport.write(b"DATA\r\n")
    elif not pipelined:
        return outcome  # nobody to send to: DATA is not sent
    start = await replies.reply(wait)
    if start.code == CLOSING:
        transport.close()
    elif len(outcome.refused) == len(rcpts):
        if start.code == 354:  # RFC 2920 3.1: a server that still says 354 gets an empty message
            transport.write(b".\r\n")
            await replies.reply(wait)
        return outcome
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    progress.data_started = True
    async with asyncio.timeout(wait + body.size / MIN_RATE):
        async with body.open() as reader:
            ends_with_crlf = await _send_body(transport, replies, reader, body.stuffed)
    transport.write(b".\r\n" if ends_with_crlf else b"\r\n.\r\n")
    outcome.reply = await replies.reply(wait)
    if outcome.reply.code != 250:
        raise aiosmtplib.SMTPDataError(outcome.reply.code, outcome.reply.message)
    return outcome


async def _send_body(
    transport: asyncio.WriteTransport, replies: _Replies, reader: BodyReader, stuffed: bool
) -> bool:
    """Write the body; True if it ended with CRLF (else the dot needs one first)."""
    if not stuffed:  # an entry from before the wire form: stuffed here, as aiosmtplib did
        data = stuff(await reader.read_all())
        transport.write(data)
        await replies.drain()
        return data.endswith(b"\r\n")
    fd, size = reader.fileno(), reader.size
    if fd is not None and transport.get_extra_info("sslcontext") is None:
        if size == 0:
            return False
        tail = os.pread(fd, 2, size - 2) if size >= 2 else b""
        with open(fd, "rb", buffering=0, closefd=False) as file:  # noqa: ASYNC230  (no read: sendfile)
            await asyncio.get_running_loop().sendfile(transport, file, 0, size)
        return tail == b"\r\n"
    last = b""
    while chunk := await reader.read(CHUNK):
        transport.write(chunk)
        last = (last + chunk)[-2:]
        await replies.drain()
    return last == b"\r\n"
