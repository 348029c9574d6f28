"""A minimal SMTP client for diagnostics: banner, EHLO, STARTTLS and nothing else (never sends mail)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from relay365.errors import Relay365Error

EHLO_NAME = "relay365-doctor.invalid"
MAX_LINE = 2048  # generous: RFC 5321 section 4.5.3.1.5 says 512 octets per reply line


class SmtpDialogError(Relay365Error):
    """The server answered something an SMTP server should not (or closed the connection)."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) -> parameters; the first line is the server's greeting."""
    caps: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        caps[keyword.upper()] = params
    return caps


class SmtpProbe:
    """``async with SmtpProbe(host, port, timeout_s=5) as probe:`` then ``probe.banner``, ``await
    probe.ehlo()``, ``await probe.starttls(ctx)``; QUIT is sent on exit."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout_s: float = 10.0,
        implicit_tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._implicit = implicit_tls
        self._server_name = server_name or host
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.banner: Reply | None = None

    async def __aenter__(self) -> Self:
        ssl_args = (
            {} if self._implicit is None else {"ssl": self._implicit, "server_hostname": self._server_name}
        )
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, **ssl_args),  # type: ignore[arg-type]
            self.timeout_s,
        )
        try:
            self.banner = await self.read_reply()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None and self._writer is not None and not self._writer.is_closing():
            with contextlib.suppress(OSError, TimeoutError, SmtpDialogError, ssl.SSLError):
                await self.command("QUIT")
        await self.close()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(self._writer.wait_closed(), self.timeout_s)
            self._writer = None

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        if self._writer is None:
            return None
        obj = self._writer.get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject) else None

    async def read_reply(self) -> Reply:
        assert self._reader is not None
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self._reader.readline(), self.timeout_s)
            if not raw:
                raise SmtpDialogError("connection closed by the server")
            line = raw[:MAX_LINE].decode("utf-8", "replace").rstrip("\r\n")
            if len(line) < 3 or not line[:3].isdigit():
                raise SmtpDialogError(f"not an SMTP reply: {line[:80]!r}")
            lines.append(line[4:])
            if len(line) == 3 or line[3] != "-":
                return Reply(int(line[:3]), tuple(lines))

    async def command(self, text: str) -> Reply:
        assert self._writer is not None
        self._writer.write(text.encode() + b"\r\n")
        await self._writer.drain()
        return await self.read_reply()

    async def ehlo(self) -> tuple[Reply, dict[str, str]]:
        reply = await self.command(f"EHLO {EHLO_NAME}")
        return reply, parse_ehlo(reply) if reply.code == 250 else {}

    async def starttls(self, context: ssl.SSLContext) -> Reply:
        """STARTTLS and the TLS handshake (raises ssl.SSLError / SSLCertVerificationError)."""
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            return reply
        assert self._writer is not None
        await asyncio.wait_for(
            self._writer.start_tls(context, server_hostname=self._server_name), self.timeout_s
        )
        return reply
