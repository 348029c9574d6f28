"""A small authoritative DNS server on 127.0.0.1 (UDP and TCP, one port) for tests and offline checks.

The zone is a plain dict, name -> records or behaviour::

    {
        "contoso.com": {
            "MX": [(0, "contoso-com.mail.protection.outlook.com")],
            "TXT": ["v=spf1 include:spf.protection.outlook.com -all"],
        },
        "contoso-com.mail.protection.outlook.com": {"A": ["127.0.0.1"]},
        "broken.test": "SERVFAIL",   # answer SERVFAIL
        "gone.test": "NXDOMAIN",     # explicit NXDOMAIN (any name not in the zone is NXDOMAIN too)
        "slow.test": "TIMEOUT",      # never answer
    }

Record types: A, AAAA, MX (preference, exchange), TXT (a str; longer than 255 octets is split into
character-strings, RFC 7208 section 3.3), CNAME, PTR, NS. A name that exists without the asked type answers
NOERROR with no data (NODATA). UDP answers over the client's payload size (512 octets without EDNS,
RFC 1035 section 4.2.1) are truncated (TC) so the client retries over TCP.

Use it as an async context manager (``async with DnsServer(zone) as srv: srv.port``) inside an event
loop, or :class:`ThreadedDnsServer` (a plain context manager running its own loop in a thread) when the
caller is synchronous, e.g. a CLI test or a blocking ``pyspf`` evaluation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import threading
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from relay365.errors import Relay365Error

log = logging.getLogger(__name__)

Behaviour = str  # "SERVFAIL" | "NXDOMAIN" | "TIMEOUT" | "REFUSED"
Records = Mapping[str, Sequence[Any]]
# name -> Records | Behaviour; typed loosely so heterogeneous dict literals type-check for callers,
# and checked at run time by _normalise (a bad zone raises DnsServerError naming the entry).
Zone = Mapping[str, Any]

_BEHAVIOURS = {"SERVFAIL", "NXDOMAIN", "TIMEOUT", "REFUSED"}
_TTL = 60


class DnsServerError(Relay365Error):
    """The DNS server could not start (bad zone or no free port)."""


def _txt(value: str) -> str:
    data = value.encode()
    chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
    return " ".join('"' + c.decode().replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)


def _rdata_text(rdtype: str, value: Any) -> str:
    if rdtype == "MX":
        pref, host = value
        return f"{int(pref)} {str(host).rstrip('.')}."
    if rdtype == "TXT":
        return _txt(str(value))
    if rdtype in ("CNAME", "PTR", "NS"):
        return f"{str(value).rstrip('.')}."
    return str(value)


def _normalise(zone: Zone) -> dict[str, Records | Behaviour]:
    out: dict[str, Records | Behaviour] = {}
    for name, spec in zone.items():
        key = name.lower().rstrip(".")
        if isinstance(spec, str):
            if spec.upper() not in _BEHAVIOURS:
                raise DnsServerError(f"zone name {name!r}: unknown behaviour {spec!r}")
            out[key] = spec.upper()
        elif not isinstance(spec, Mapping):
            raise DnsServerError(f"zone name {name!r}: expected records or a behaviour, got {spec!r}")
        else:
            for rdtype_any, values in spec.items():
                rdtype = rdtype_any.upper()
                for value in values:
                    try:
                        dns.rrset.from_text(key + ".", _TTL, "IN", rdtype, _rdata_text(rdtype, value))
                    except (dns.exception.DNSException, ValueError, TypeError) as exc:
                        raise DnsServerError(f"zone name {name!r}: bad {rdtype} {value!r}: {exc}") from exc
            out[key] = {rdtype.upper(): list(values) for rdtype, values in spec.items()}
    return out


class DnsServer:
    """An authoritative DNS server for one zone dict, on 127.0.0.1 UDP+TCP, same port for both."""

    def __init__(self, zone: Zone, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._zone = _normalise(zone)
        self._host = host
        self._want_port = port
        self.port = 0
        self.queries: list[tuple[str, str, str]] = []  # (transport, name, type) as received
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def nameserver(self) -> str:
        """``host:port`` as the ``--nameserver`` options take it."""
        return f"{self._host}:{self.port}"

    def answer(self, wire: bytes) -> bytes | None:
        """The response to one query in wire format, or None to stay silent (TIMEOUT, garbage)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = question.name.to_text().lower().rstrip(".")
        rdtype = dns.rdatatype.to_text(question.rdtype)
        spec = self._zone.get(name)
        if spec is None or spec == "NXDOMAIN":
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif spec == "TIMEOUT":
            return None
        elif spec == "SERVFAIL":
            response.flags &= ~dns.flags.AA
            response.set_rcode(dns.rcode.SERVFAIL)
        elif spec == "REFUSED":
            response.set_rcode(dns.rcode.REFUSED)
        elif isinstance(spec, Mapping):
            self._add_answers(response, name, rdtype)
        return response.to_wire()

    def _add_answers(self, response: dns.message.Message, name: str, rdtype: str) -> None:
        """Add the records of ``name``; follow CNAMEs inside the zone (at most 8 hops), as a server
        authoritative for both names does (RFC 1034 section 4.3.2)."""
        for _ in range(8):
            spec = self._zone.get(name)
            if not isinstance(spec, Mapping):
                return
            values = spec.get(rdtype)
            if values:
                texts = [_rdata_text(rdtype, v) for v in values]
                response.answer.append(dns.rrset.from_text(name + ".", _TTL, "IN", rdtype, *texts))
                return
            targets = spec.get("CNAME")
            if not targets or rdtype == "CNAME":
                return
            response.answer.append(
                dns.rrset.from_text(name + ".", _TTL, "IN", "CNAME", _rdata_text("CNAME", targets[0]))
            )
            name = str(targets[0]).lower().rstrip(".")

    # --- UDP -----------------------------------------------------------------------------------------
    def _udp_reply(self, data: bytes) -> bytes | None:
        wire = self.answer(data)
        if wire is None:
            return None
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:  # pragma: no cover - answer() already parsed it
            return None
        limit = query.payload if query.edns >= 0 else 512
        if len(wire) > limit:
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA | dns.flags.TC
            return response.to_wire()
        return wire

    # --- TCP (RFC 1035 section 4.2.2: two-octet length prefix) -----------------------------------------
    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                head = await reader.readexactly(2)
                data = await reader.readexactly(struct.unpack("!H", head)[0])
                self._record("tcp", data)
                wire = self.answer(data)
                if wire is None:
                    continue  # TIMEOUT: read on, never answer
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)

    def _record(self, transport: str, data: bytes) -> None:
        with contextlib.suppress(dns.exception.DNSException):
            q = dns.message.from_wire(data)
            if q.question:
                rr = q.question[0]
                self.queries.append((transport, rr.name.to_text(), dns.rdatatype.to_text(rr.rdtype)))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        server = self

        class _Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
                server._record("udp", data)
                reply = server._udp_reply(data)
                if reply is not None:
                    self.transport.sendto(reply, addr)  # type: ignore[attr-defined]

        last: OSError | None = None
        for _ in range(20):  # the UDP port may be taken for TCP by someone else: try another
            udp, _proto = await loop.create_datagram_endpoint(_Udp, local_addr=(self._host, self._want_port))
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._tcp_client, self._host, port)
            except OSError as exc:
                last = exc
                udp.close()
                if self._want_port:
                    break
                continue
            self._udp, self.port = udp, port
            log.debug("dns server on %s (udp+tcp)", self.nameserver)
            return
        raise DnsServerError(f"could not bind UDP and TCP on one port: {last}")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._tcp.wait_closed()
            self._tcp = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class ThreadedDnsServer:
    """:class:`DnsServer` running on its own event loop in a daemon thread, for synchronous callers."""

    def __init__(self, zone: Zone, *, host: str = "127.0.0.1") -> None:
        self.server = DnsServer(zone, host=host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def nameserver(self) -> str:
        return self.server.nameserver

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self.server.start())
        except BaseException as exc:  # handed to the starting thread
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.server.stop())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="dns-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise DnsServerError("DNS server thread did not start within 10 s")
        if self._error is not None:
            raise DnsServerError(f"DNS server did not start: {self._error}") from self._error
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
