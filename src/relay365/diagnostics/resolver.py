"""Building the DNS resolvers the diagnostics use: the system's, or one pointed at ``host:port``."""

from __future__ import annotations

import ipaddress

import dns.asyncresolver
import dns.resolver

from relay365.errors import ConfigError

DEFAULT_TIMEOUT = 3.0


def parse_nameserver(value: str) -> tuple[str, int]:
    """``"127.0.0.1:5353"`` -> ("127.0.0.1", 5353); ``"127.0.0.1"`` -> port 53; ``"[::1]:53"`` for IPv6."""
    host, port = value, 53
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:]) if rest[1:].isdigit() else -1
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
        port = int(port_text) if port_text.isdigit() else -1
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError("nameserver", value, "Not an IP address with an optional :port.") from exc
    if not 0 < port < 65536:
        raise ConfigError("nameserver", value, "Port must be 1-65535.")
    return host, port


def make_resolver(
    nameserver: str | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> dns.resolver.Resolver:
    """A synchronous resolver: the system's (``/etc/resolv.conf``) or one for ``nameserver``."""
    if nameserver is None:
        resolver = dns.resolver.Resolver()
    else:
        host, port = parse_nameserver(nameserver)
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [host]
        resolver.port = port
    resolver.timeout = timeout
    resolver.lifetime = timeout
    return resolver


def make_async_resolver(
    nameserver: str | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> dns.asyncresolver.Resolver:
    """The asyncio twin of :func:`make_resolver`."""
    if nameserver is None:
        resolver = dns.asyncresolver.Resolver()
    else:
        host, port = parse_nameserver(nameserver)
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [host]
        resolver.port = port
    resolver.timeout = timeout
    resolver.lifetime = timeout
    return resolver
