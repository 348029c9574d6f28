"""The one place DNS resolvers are built: the system's (``/etc/resolv.conf``) or one pointed at
configured name servers given as ``ip``, ``ip:port`` or ``[ipv6]:port``.

Delivery (MX lookups of Direct Send and connector relay) and the diagnostics (doctor, spf) use the same
builder, so a name server written one way in the config means the same thing everywhere.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from relay365.errors import ConfigError

if TYPE_CHECKING:  # dnspython is imported when a resolver is made (the settings only parse addresses)
    import dns.asyncresolver
    import dns.resolver

DEFAULT_TIMEOUT = 3.0
R = TypeVar("R", "dns.resolver.Resolver", "dns.asyncresolver.Resolver")


def parse_nameserver(value: str, *, key: str = "nameserver") -> tuple[str, int]:
    """``"127.0.0.1:5353"`` -> ("127.0.0.1", 5353); ``"127.0.0.1"`` -> port 53; ``"[::1]:53"`` and
    ``"::1"`` for IPv6. ``key`` names the setting in the error."""
    host, port = value, 53
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:]) if rest[1:].isdigit() else -1
        elif rest:
            port = -1
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
        port = int(port_text) if port_text.isdigit() else -1
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(key, value, "Not an IP address with an optional :port.") from exc
    if not 0 < port < 65536:
        raise ConfigError(key, value, "Port must be 1-65535.")
    return host, port


def _configure(resolver: R, nameservers: Sequence[str], timeout: float) -> R:
    if nameservers:
        parsed = [parse_nameserver(ns) for ns in nameservers]
        ports = {port for _, port in parsed}
        if len(ports) > 1:
            raise ConfigError("nameservers", list(nameservers), "All name servers must use the same port.")
        resolver.nameservers = [host for host, _ in parsed]
        resolver.port = ports.pop()
    resolver.timeout = timeout
    resolver.lifetime = timeout
    return resolver


def _servers(nameservers: Sequence[str] | str | None) -> tuple[str, ...]:
    if nameservers is None:
        return ()
    return (nameservers,) if isinstance(nameservers, str) else tuple(nameservers)


def make_resolver(
    nameservers: Sequence[str] | str | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> dns.resolver.Resolver:
    """A synchronous resolver: the system's, or one for ``nameservers``."""
    import dns.resolver

    servers = _servers(nameservers)
    return _configure(dns.resolver.Resolver(configure=not servers), servers, timeout)


def make_async_resolver(
    nameservers: Sequence[str] | str | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> dns.asyncresolver.Resolver:
    """The asyncio twin of :func:`make_resolver`."""
    import dns.asyncresolver

    servers = _servers(nameservers)
    return _configure(dns.asyncresolver.Resolver(configure=not servers), servers, timeout)
