"""Live loopback peers for the doctor's tests: a scriptable SMTP listener (plain, STARTTLS or implicit
TLS), certificates made with trustme, a closed port, and a loop in a thread for CLI tests."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trustme

T = TypeVar("T")


@dataclass
class SmtpBehaviour:
    banner: str = "220 smtp.test Microsoft ESMTP MAIL Service ready"
    before_tls: tuple[str, ...] = (
        "SIZE 157286400",
        "PIPELINING",
        "ENHANCEDSTATUSCODES",
        "STARTTLS",
        "8BITMIME",
    )
    after_tls: tuple[str, ...] = ("SIZE 157286400", "PIPELINING", "ENHANCEDSTATUSCODES", "AUTH LOGIN XOAUTH2")
    tls: ssl.SSLContext | None = None
    implicit_tls: bool = False
    silent: bool = False  # accept and never speak


@dataclass
class SmtpListener:
    behaviour: SmtpBehaviour
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        b = self.behaviour
        tls = b.implicit_tls
        try:
            if b.silent:
                await reader.read()
                return
            writer.write(b.banner.encode() + b"\r\n")
            while True:
                line = await reader.readline()
                if not line:
                    return
                cmd = line.decode().strip().upper()
                if cmd.startswith("EHLO"):
                    caps = b.after_tls if tls else b.before_tls
                    lines = ["smtp.test Hello", *caps]
                    out = "".join(f"250-{x}\r\n" for x in lines[:-1]) + f"250 {lines[-1]}\r\n"
                    writer.write(out.encode())
                elif cmd == "STARTTLS" and b.tls is not None and not tls:
                    writer.write(b"220 2.0.0 SMTP server ready\r\n")
                    await writer.drain()
                    await writer.start_tls(b.tls)
                    tls = True
                elif cmd == "QUIT":
                    writer.write(b"221 2.0.0 Service closing transmission channel\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"502 5.5.2 Command not implemented\r\n")
                await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, OSError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)

    async def __aenter__(self) -> SmtpListener:
        ssl_ctx = self.behaviour.tls if self.behaviour.implicit_tls else None
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ssl_ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


class Certs:
    """A private CA and server certificates for 127.0.0.1: valid, expired, expiring soon, wrong name."""

    def __init__(self, tmp: Any) -> None:
        self.ca = trustme.CA()
        now = dt.datetime.now(dt.UTC)
        self.valid = self.ca.issue_cert("127.0.0.1", "relay.test")
        self.expired = self.ca.issue_cert(
            "127.0.0.1", not_before=now - dt.timedelta(days=60), not_after=now - dt.timedelta(days=1)
        )
        self.soon = self.ca.issue_cert("127.0.0.1", not_after=now + dt.timedelta(days=10))
        self.wrong_name = self.ca.issue_cert("other.example")
        self.ca_file = str(tmp / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)

    def server_context(self, leaf: trustme.LeafCert) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        leaf.configure_cert(ctx)
        return ctx


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port bound on 127.0.0.1 but not listening: connecting is refused, and nobody else takes it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


class LoopThread:
    """An event loop in a thread, to host async peers while a synchronous CLI runs its own loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> LoopThread:
        self._thread.start()
        return self

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout=10)

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()
