"""A raw SMTP client for hardening tests: send exact bytes, read whole (multi-line) replies."""

from __future__ import annotations

import asyncio
import contextlib
import ssl


class RawSMTP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, *, tls: ssl.SSLContext | None = None) -> RawSMTP:
        r, w = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None),
            10,
        )
        return cls(r, w)

    async def reply(self, timeout: float = 10.0) -> str:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionResetError("server closed: " + " | ".join(lines))
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes, timeout: float = 10.0) -> str:
        data = line if isinstance(line, bytes) else line.encode()
        await self.send(data + b"\r\n")
        return await self.reply(timeout)

    async def starttls(self, ctx: ssl.SSLContext) -> None:
        assert (await self.cmd("STARTTLS")).startswith("220")
        await self.writer.start_tls(ctx, server_hostname="localhost")

    async def closed(self, timeout: float = 10.0) -> bool:
        """True once the server has closed the connection (EOF)."""
        data = await asyncio.wait_for(self.reader.read(), timeout)
        return data == b"" or data.endswith(b"\r\n")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


def client_context(ca_file: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    if ca_file is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
