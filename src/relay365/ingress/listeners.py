"""The device listeners of a running ingress: one listening socket per ``[[listener]]``, the endpoint each
new connection reads its settings from, and how a reload changes them.

A reload is prepared, then committed or rolled back (``Listeners.prepare``, ``ListenerChange``):

* a listener whose address and port stay the same keeps its socket: new connections get the new
  settings (TLS mode, limits, timeouts) and a TLS context built again from the files, so a certificate
  renewed at the same path is served from then on;
* a new listener, or one whose address or port changed, is bound at ``prepare``; a listener that is gone
  or moved stops accepting at ``commit`` (its socket is closed). Sessions it carries go on to their end
  with the settings they started with;
* an old socket in the way of a new binding (the same port on an overlapping address: a port moved from
  one listener to another) is closed before binding;
* if a binding fails (an address in use, not on this host), ``prepare`` closes what it bound, binds
  again what it closed first, and raises: the listeners are as before, and the reload is refused.

A socket that stops accepting does not end the connections it accepted (``asyncio.Server.close``); the
ingress's shutdown reaches their sessions like any other (``context.shutdown``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

from relay365.ingress.context import IngressContext
from relay365.ingress.handshake import ImplicitTLSAcceptor
from relay365.ingress.server import RelaySMTP
from relay365.settings import ListenerSettings

log = logging.getLogger(__name__)


@dataclass
class Endpoint:
    """A listener's current settings and TLS context. Each new connection takes both as they are when
    it arrives; a reload replaces them; a session keeps the ones it started with."""

    settings: ListenerSettings
    tls: ssl.SSLContext | None
    # a listening socket bound already (an ingress worker's, inherited from the supervisor), or None
    sock: socket.socket | None = None


async def start_listener(ctx: IngressContext, endpoint: Endpoint) -> asyncio.Server:
    def accept() -> asyncio.Protocol:
        listener, tls = endpoint.settings, endpoint.tls

        def session() -> RelaySMTP:
            return RelaySMTP(ctx, listener, tls)

        if listener.tls == "implicit":  # the handshake runs in the relay's code (ingress/handshake.py)
            assert tls is not None
            return ImplicitTLSAcceptor(
                session=session, context=tls, listener=listener, failures=ctx.tls_failures
            )
        return session()

    s = endpoint.settings
    loop = asyncio.get_running_loop()
    if endpoint.sock is not None:
        return await loop.create_server(accept, sock=endpoint.sock, backlog=1024)
    return await loop.create_server(accept, host=s.address, port=s.port, reuse_address=True, backlog=1024)


@dataclass
class _Bound:
    endpoint: Endpoint
    server: asyncio.Server
    port: int  # the bound port (the kernel's when the config says 0)


def _overlap(a: str, b: str) -> bool:
    x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    return x.version == y.version and (x == y or x.is_unspecified or y.is_unspecified)


def _binding(s: ListenerSettings) -> tuple[str, int]:
    """What needs a socket of its own: the address and the port (0: the kernel's, kept as it is)."""
    return s.address, s.port


def _in_the_way(old: _Bound, new: ListenerSettings) -> bool:
    return new.port != 0 and new.port == old.port and _overlap(old.endpoint.settings.address, new.address)


@dataclass
class ListenerChange:
    """A prepared reload of the listeners: new sockets bound, nothing else changed yet."""

    listeners: Listeners
    endpoints: list[Endpoint]  # the new config's, in order
    kept: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)  # new names, and names whose address or port changed
    removed: list[str] = field(default_factory=list)  # names gone, and the old sockets of moved ones
    bound: dict[str, _Bound] = field(default_factory=dict)
    closed_first: dict[str, _Bound] = field(default_factory=dict)

    def commit(self) -> None:
        self.listeners._commit(self)

    async def rollback(self) -> None:
        await self.listeners._rollback(self)

    def describe(self) -> str:
        """``added a, b; closed c`` (a moved listener is both), or ``unchanged``."""
        parts = [f"{what} {', '.join(names)}" for what, names in self._lists() if names]
        return "; ".join(parts) or "unchanged"

    def _lists(self) -> tuple[tuple[str, list[str]], ...]:
        return ("added", self.added), ("closed", self.removed)


class Listeners:
    def __init__(self, ctx: IngressContext) -> None:
        self._ctx = ctx
        self._bound: dict[str, _Bound] = {}
        self._retired: list[asyncio.Server] = []  # closed by a reload; their sessions may still run

    @property
    def ports(self) -> Mapping[str, int]:
        return {name: b.port for name, b in self._bound.items()}

    async def _bind(self, endpoint: Endpoint) -> _Bound:
        server = await start_listener(self._ctx, endpoint)
        bound = _Bound(endpoint, server, server.sockets[0].getsockname()[1])
        s = endpoint.settings
        log.info("listening on %s:%d (%s, tls=%s)", s.address, bound.port, s.name, s.tls)
        return bound

    async def open(self, endpoints: list[Endpoint]) -> None:
        """Bind every listener in order (at start); on a failure the caller closes what was bound."""
        for endpoint in endpoints:
            self._bound[endpoint.settings.name] = await self._bind(endpoint)

    async def prepare(self, endpoints: list[Endpoint]) -> ListenerChange:
        """Bind what a new config adds or moves (module docstring); raises ``OSError`` with everything
        as it was when a binding fails."""
        change = ListenerChange(self, endpoints)
        new_names = {e.settings.name for e in endpoints}
        for e in endpoints:
            old = self._bound.get(e.settings.name)
            same = old is not None and _binding(old.endpoint.settings) == _binding(e.settings)
            (change.kept if same else change.added).append(e.settings.name)
        change.removed = [n for n in self._bound if n not in new_names or n in change.added]
        adding = [e.settings for e in endpoints if e.settings.name in change.added]
        for name in change.removed:
            old = self._bound[name]
            if any(_in_the_way(old, new) for new in adding):
                old.server.close()
                change.closed_first[name] = old
        try:
            for e in endpoints:
                if e.settings.name in change.added:
                    change.bound[e.settings.name] = await self._bind(e)
        except BaseException:
            await self._rollback(change)
            raise
        return change

    def _commit(self, change: ListenerChange) -> None:
        for name in change.removed:
            old = self._bound[name]
            if name not in change.closed_first:
                old.server.close()
            self._retired.append(old.server)
            s = old.endpoint.settings
            log.info("stopped listening on %s:%d (%s): its open sessions finish", s.address, old.port, name)
        bound: dict[str, _Bound] = {}
        for e in change.endpoints:
            name = e.settings.name
            if name in change.bound:
                bound[name] = change.bound[name]
            else:  # kept: the same socket; new connections read the new settings and TLS context
                kept = self._bound[name]
                kept.endpoint.settings, kept.endpoint.tls = e.settings, e.tls
                bound[name] = kept
        self._bound = bound

    async def _rollback(self, change: ListenerChange) -> None:
        for b in change.bound.values():
            b.server.close()
        change.bound.clear()
        for name, old in change.closed_first.items():
            try:
                self._bound[name] = await self._bind(old.endpoint)
            except OSError as e:  # taken meanwhile by someone else: say so, the rest keeps running
                log.error("listener %s could not be bound again after a refused reload: %s", name, e)
                del self._bound[name]
        change.closed_first.clear()

    def sockets(self) -> dict[str, socket.socket]:
        """Listener name -> its listening socket (what ingress workers inherit, service/workers.py)."""
        out: dict[str, socket.socket] = {}
        for name, b in self._bound.items():
            [sock, *_] = b.server.sockets  # one address: one socket
            out[name] = sock
        return out

    def close(self) -> list[asyncio.Server]:
        """Stop accepting on every listener; the servers (closed by reloads too), to wait for. The
        ports stay readable (what was bound)."""
        servers = [b.server for b in self._bound.values()] + self._retired
        for server in servers:
            server.close()
        self._retired = []
        return servers
