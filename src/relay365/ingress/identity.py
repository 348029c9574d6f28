"""Who is this device? Three ways, mirroring Microsoft's three options: source IP / CIDR allow-list,
SMTP AUTH against per-device Argon2id hashes, or a TLS client certificate (fingerprint or subject).

Also the guards: connection caps (global and per IP, answered ``421 4.7.0``) and AUTH brute-force
protection (failures counted per address and per user name; a growing delay after each failure, then
AUTH is refused with ``454 4.7.0`` for that address or user, while mail from devices known by address
or certificate keeps flowing).
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

    def login_still_valid(self, device: DeviceSettings, listener: str) -> DeviceSettings | None:
        """After a reload: the entry a session that logged in as ``device`` now has, if its login still
        holds (the same name, user name and password hash, still allowed on ``listener``), else None."""
        d = self._by_user.get((device.username or "").lower())
        same = d is not None and (d.name, d.password_hash) == (device.name, device.password_hash)
        return d if same and d is not None and self._on(d, listener) else None

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

    def configure(self, *, total: int, per_ip: int) -> None:
        """New caps (a reload): connections already open count against them, none is closed."""
        self._total, self._per_ip = total, per_ip

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


class _Failures:
    """Failure counts per key (an address or a user name); a key's count ends ``window`` seconds
    after its last failure. Bounded: beyond ``MAX_TRACKED`` keys the oldest entries go first."""

    def __init__(self, *, window: float, clock: Callable[[], float]) -> None:
        self._window = window
        self._clock = clock
        self._counts: dict[str, tuple[int, float]] = {}  # key -> (failures, time of the last one)
        self._pending: dict[str, int] = {}  # key -> passwords being verified right now

    def set_window(self, window: float) -> None:
        self._window = window

    def count(self, key: str) -> int:
        count, last = self._counts.get(key, (0, 0.0))
        if count and self._clock() - last > self._window:
            del self._counts[key]
            count = 0
        return count + self._pending.get(key, 0)

    def begin(self, key: str) -> None:
        self._pending[key] = self._pending.get(key, 0) + 1

    def end(self, key: str, *, failed: bool) -> int:
        left = self._pending.get(key, 1) - 1
        if left > 0:
            self._pending[key] = left
        else:
            self._pending.pop(key, None)
        if not failed:
            return 0
        now = self._clock()
        count, last = self._counts.pop(key, (0, 0.0))  # re-inserted: ordered by last failure
        count = (count if now - last <= self._window else 0) + 1
        self._counts[key] = (count, now)
        if len(self._counts) > MAX_TRACKED:
            self._prune()
        return count

    def clear(self, key: str) -> None:
        self._counts.pop(key, None)

    def _prune(self) -> None:
        now = self._clock()
        for key, (_count, last) in list(self._counts.items()):
            if now - last > self._window or len(self._counts) > MAX_TRACKED:
                del self._counts[key]
            else:
                break  # ordered by last failure: the rest is newer


MAX_TRACKED = 100_000  # addresses and user names with recent failures (a few MB at most)


def address_key(ip: str) -> str:
    """The unit an address block applies to: the IPv4 address, or the IPv6 /64 (one host or one
    customer network can use every address of its /64; RFC 6177)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class AuthGuard:
    """AUTH brute-force protection: failures are counted per source address and per user name.

    After ``auth_failures_before_block`` failures from an address, or for a user name (from any
    address), AUTH from that address, or for that user, is refused for ``auth_block_seconds`` after
    the last failure, before any password is verified: a right password during a block does not
    lift it. A success clears only that user's count, so a device that knows its own password
    cannot reset the count of the address it guesses another user's password from. Passwords being
    verified count as failures until they are known not to be, so a burst of parallel guesses
    cannot slip past the limit. Each failure is answered after a delay that doubles (at most 8x).
    """

    def __init__(self, settings: ServerSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = settings.auth_failures_before_block
        self._delay = settings.auth_failure_delay
        self._by_address = _Failures(window=settings.auth_block_seconds, clock=clock)
        self._by_user = _Failures(window=settings.auth_block_seconds, clock=clock)

    def configure(self, settings: ServerSettings) -> None:
        """New limits (a reload); the failures counted so far are kept: a reload lifts no block."""
        self._limit = settings.auth_failures_before_block
        self._delay = settings.auth_failure_delay
        self._by_address.set_window(settings.auth_block_seconds)
        self._by_user.set_window(settings.auth_block_seconds)

    @staticmethod
    def _user(username: str) -> str:
        return username.lower()[:256]

    def blocked(self, ip: str, username: str | None = None) -> bool:
        if self._by_address.count(address_key(ip)) >= self._limit:
            return True
        return username is not None and self._by_user.count(self._user(username)) >= self._limit

    def begin(self, ip: str, username: str) -> bool:
        """Before verifying a password: False while blocked; else the attempt is reserved and must
        end with ``success`` or ``failure``."""
        if self.blocked(ip, username):
            return False
        self._by_address.begin(address_key(ip))
        self._by_user.begin(self._user(username))
        return True

    def success(self, ip: str, username: str) -> None:
        self._by_address.end(address_key(ip), failed=False)
        user = self._user(username)
        self._by_user.end(user, failed=False)
        self._by_user.clear(user)

    def abandon(self, ip: str, username: str) -> None:
        """End an attempt that never finished (its worker process died): neither a failure nor a
        success; the counts stay as they were before ``begin``."""
        self._by_address.end(address_key(ip), failed=False)
        self._by_user.end(self._user(username), failed=False)

    def failure(self, ip: str, username: str) -> float:
        """Record a failure; return the delay before answering 535 (doubling, capped at 8 x base)."""
        count = max(
            self._by_address.end(address_key(ip), failed=True),
            self._by_user.end(self._user(username), failed=True),
        )
        return float(min(self._delay * (2 ** min(count - 1, 3)), self._delay * 8))
