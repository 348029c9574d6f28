"""What each device did lately: last connection, address, TLS version, messages today, last refusal.

Answers the admin's first question when a scanner shows "send failed": did it reach the relay at all,
and what did the relay answer? Kept in memory by the process that serves the devices (ingress calls it
from the event loop: no locks, no I/O); the console reads it through :class:`DeviceActivitySource`.
A connection whose device is not known yet (before AUTH, or an address no device claims) is kept under
``unknown`` with its address, so refusals of unidentified clients show too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

UNKNOWN = "unknown"
MAX_UNKNOWN = 100  # unidentified addresses remembered (a scan must not grow this without bound)


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    name: str
    last_seen: float = 0.0
    address: str = ""
    listener: str = ""
    tls_version: str = ""  # "" for plain text
    messages_today: int = 0
    day: str = ""  # the UTC date messages_today counts
    last_refusal: str = ""  # the reply, e.g. "550 5.7.1 may not send as x"
    last_refusal_at: float = 0.0


class DeviceActivitySource(Protocol):
    def devices(self) -> list[DeviceStatus]: ...


def _day(at: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(at))


class DeviceActivity:
    def __init__(self, *, configured: tuple[str, ...] = (), clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._devices: dict[str, DeviceStatus] = {name: DeviceStatus(name) for name in configured}
        self._unknown: dict[str, DeviceStatus] = {}

    def _get(self, device: str | None, address: str) -> tuple[dict[str, DeviceStatus], str, DeviceStatus]:
        if device:
            return self._devices, device, self._devices.get(device) or DeviceStatus(device)
        if address not in self._unknown and len(self._unknown) >= MAX_UNKNOWN:
            oldest = min(self._unknown.values(), key=lambda d: d.last_seen)
            del self._unknown[oldest.address]
        return self._unknown, address, self._unknown.get(address) or DeviceStatus(UNKNOWN, address=address)

    def now(self) -> float:
        return self._clock()

    def seen(self, device: str | None, *, address: str, listener: str, tls_version: str) -> None:
        table, key, d = self._get(device, address)
        table[key] = replace(
            d, last_seen=self._clock(), address=address, listener=listener, tls_version=tls_version
        )

    def accepted(self, device: str, *, address: str) -> None:
        table, key, d = self._get(device, address)
        now = self._clock()
        today = _day(now)
        count = d.messages_today + 1 if d.day == today else 1
        table[key] = replace(d, last_seen=now, address=address, messages_today=count, day=today)

    def refused(self, device: str | None, *, address: str, reply: str) -> None:
        table, key, d = self._get(device, address)
        now = self._clock()
        table[key] = replace(d, last_seen=now, address=address, last_refusal=reply, last_refusal_at=now)

    def devices(self) -> list[DeviceStatus]:
        today = _day(self._clock())
        out = [d if d.day == today else replace(d, messages_today=0) for d in self._devices.values()]
        out.sort(key=lambda d: d.name)
        return out + sorted(self._unknown.values(), key=lambda d: -d.last_seen)
