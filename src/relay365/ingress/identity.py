"""Who is this device? Three ways, mirroring Microsoft's three options: source IP / CIDR allow-list,
SMTP AUTH against per-device Argon2id hashes, or a TLS client certificate (fingerprint or subject).

Also the per-IP guards: connection caps (global and per IP, answered ``421 4.7.0``) and AUTH brute
force protection (a growing delay after each failure, then ``421 4.7.0`` and a block of the IP).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from relay365.credentials import verify_password
from relay365.settings import DeviceSettings, ServerSettings

MAX_CONCURRENT_VERIFICATIONS = 4  # Argon2id verifications at once (19 MiB and ~50 ms of CPU each)


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    fingerprint: str  # sha256 of the DER, lowercase hex without colons
    subject: str  # RFC 4514-like "CN=printer.lan,O=Contoso"
    names: tuple[str, ...]  # CN and DNS SANs


def peer_certificate(der: bytes | None, decoded: dict[str, object] | None) -> PeerCertificate | None:
    if not der:
        return None
    parts: list[str] = []
    names: list[str] = []
    for rdn in (decoded or {}).get("subject", ()) or ():  # type: ignore[attr-defined]
        for key, value in rdn:
            short = {
                "commonName": "CN",
                "organizationName": "O",
                "organizationalUnitName": "OU",
                "countryName": "C",
                "localityName": "L",
                "stateOrProvinceName": "ST",
            }.get(key, key)
            parts.append(f"{short}={value}")
            if key == "commonName":
                names.append(str(value))
    for kind, value in (decoded or {}).get("subjectAltName", ()) or ():  # type: ignore[attr-defined]
        if kind == "DNS":
            names.append(str(value))
    return PeerCertificate(hashlib.sha256(der).hexdigest(), ",".join(parts), tuple(names))


class DeviceDirectory:
    def __init__(self, devices: Iterable[DeviceSettings]) -> None:
        self._devices = tuple(devices)
        self._by_user = {d.username.lower(): d for d in self._devices if d.username}
        self._verifying = asyncio.Semaphore(MAX_CONCURRENT_VERIFICATIONS)

    def _on(self, d: DeviceSettings, listener: str) -> bool:
        return not d.listeners or listener in d.listeners

    def by_ip(self, ip: str, listener: str) -> DeviceSettings | None:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        best: tuple[int, DeviceSettings] | None = None
        for d in self._devices:
            if not self._on(d, listener):
                continue
            for net in d.ip_allow:
                better = best is None or net.prefixlen > best[0]
                if addr.version == net.version and addr in net and better:
                    best = (net.prefixlen, d)
        return best[1] if best else None

    def by_certificate(self, cert: PeerCertificate, listener: str) -> DeviceSettings | None:
        for d in self._devices:
            if not self._on(d, listener):
                continue
            if cert.fingerprint in d.client_cert_fingerprints:
                return d
            if any(s == cert.subject or s.removeprefix("CN=") in cert.names for s in d.client_cert_subjects):
                return d
        return None

    async def by_password(self, username: str, password: str, listener: str) -> DeviceSettings | None:
        """Argon2id verify runs in a thread; an unknown user costs the same (no enumeration)."""
        d = self._by_user.get(username.lower())
        async with self._verifying:  # bounded CPU and memory for a burst of logins
            ok = await asyncio.to_thread(verify_password, d.password_hash if d else None, password)
        if ok and d is not None and self._on(d, listener):
            return d
        return None


class ConnectionLimiter:
    """Global and per-IP connection caps (aiosmtpd has none)."""

    def __init__(self, *, total: int, per_ip: int) -> None:
        self._total, self._per_ip = total, per_ip
        self._count = 0
        self._by_ip: dict[str, int] = {}

    def admit(self, ip: str) -> str | None:
        if self._count >= self._total:
            return "421 4.7.0 Too many connections, try again later"
        if self._by_ip.get(ip, 0) >= self._per_ip:
            return "421 4.7.0 Too many connections from your address, try again later"
        self._count += 1
        self._by_ip[ip] = self._by_ip.get(ip, 0) + 1
        return None

    def release(self, ip: str) -> None:
        self._count -= 1
        left = self._by_ip.get(ip, 1) - 1
        if left <= 0:
            self._by_ip.pop(ip, None)
        else:
            self._by_ip[ip] = left

    @property
    def active(self) -> int:
        return self._count


class AuthGuard:
    """Per-IP AUTH failure accounting: delay grows with failures; after N the IP is blocked."""

    def __init__(self, settings: ServerSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = settings.auth_failures_before_block
        self._block_for = settings.auth_block_seconds
        self._delay = settings.auth_failure_delay
        self._clock = clock
        self._failures: dict[str, tuple[int, float]] = {}

    def blocked(self, ip: str) -> bool:
        count, since = self._failures.get(ip, (0, 0.0))
        if count and self._clock() - since > self._block_for:
            self._failures.pop(ip, None)
            return False
        return count >= self._limit

    def failure_delay(self, ip: str) -> float:
        """Record a failure; the delay before answering 535 (doubling, capped at 8 x base)."""
        count, _ = self._failures.get(ip, (0, 0.0))
        self._failures[ip] = (count + 1, self._clock())
        return float(min(self._delay * (2 ** min(count, 3)), self._delay * 8))

    def success(self, ip: str) -> None:
        self._failures.pop(ip, None)
