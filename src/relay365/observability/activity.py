"""What each device did lately: last connection, address, TLS version, messages today, last refusal.

Answers the admin's first question when a scanner shows "send failed": did it reach the relay at all,
and what did the relay answer? Kept in memory by the process that serves the devices (ingress calls it
from the event loop: no locks, no I/O, a few attribute stores per call); the console reads snapshots
through :class:`DeviceActivitySource`. A connection whose device is not known yet (before AUTH, or an
address no device claims) is kept under ``unknown`` with its address, so refusals of unidentified
clients show too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

UNKNOWN = "unknown"
MAX_UNKNOWN = 100  # unidentified addresses remembered (a scan must not grow this without bound)
DAY = 86_400


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


class _Record:
    __slots__ = (
        "address",
        "day",
        "last_refusal",
        "last_refusal_at",
        "last_seen",
        "listener",
        "name",
        "tls_version",
        "today",
    )  # fmt: skip

    def __init__(self, name: str, address: str = "") -> None:
        self.name = name
        self.address = address
        self.last_seen = 0.0
        self.listener = ""
        self.tls_version = ""
        self.today = 0
        self.day = -1  # days since the epoch (UTC) that ``today`` counts
        self.last_refusal = ""
        self.last_refusal_at = 0.0


class DeviceActivity:
    def __init__(self, *, configured: tuple[str, ...] = (), clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._devices: dict[str, _Record] = {name: _Record(name) for name in configured}
        self._unknown: dict[str, _Record] = {}

    def now(self) -> float:
        return self._clock()

    def configure(self, configured: tuple[str, ...]) -> None:
        """The configured devices changed (a reload): new ones are listed, removed ones that were
        never seen go; a removed device that sent something keeps its record until the restart."""
        for name in configured:
            self._devices.setdefault(name, _Record(name))
        for name, rec in list(self._devices.items()):
            if name not in configured and not rec.last_seen:
                del self._devices[name]

    def _get(self, device: str | None, address: str) -> _Record:
        if device:
            rec = self._devices.get(device)
            if rec is None:
                rec = self._devices[device] = _Record(device)
            return rec
        rec = self._unknown.get(address)
        if rec is None:
            if len(self._unknown) >= MAX_UNKNOWN:
                oldest = min(self._unknown.values(), key=lambda d: d.last_seen)
                del self._unknown[oldest.address]
            rec = self._unknown[address] = _Record(UNKNOWN, address)
        return rec

    def seen(self, device: str | None, *, address: str, listener: str, tls_version: str) -> None:
        rec = self._get(device, address)
        rec.last_seen, rec.address, rec.listener, rec.tls_version = (
            self._clock(),
            address,
            listener,
            tls_version,
        )

    def accepted(self, device: str, *, address: str) -> None:
        rec = self._get(device, address)
        now = self._clock()
        day = int(now // DAY)
        rec.today = rec.today + 1 if rec.day == day else 1
        rec.day, rec.last_seen, rec.address = day, now, address

    def refused(self, device: str | None, *, address: str, reply: str) -> None:
        rec = self._get(device, address)
        now = self._clock()
        rec.last_seen, rec.address, rec.last_refusal, rec.last_refusal_at = now, address, reply, now

    def devices(self) -> list[DeviceStatus]:
        today = int(self._clock() // DAY)

        def snapshot(r: _Record) -> DeviceStatus:
            return DeviceStatus(
                name=r.name,
                last_seen=r.last_seen,
                address=r.address,
                listener=r.listener,
                tls_version=r.tls_version,
                messages_today=r.today if r.day == today else 0,
                day=time.strftime("%Y-%m-%d", time.gmtime(today * DAY)),
                last_refusal=r.last_refusal,
                last_refusal_at=r.last_refusal_at,
            )

        known = [snapshot(r) for r in sorted(self._devices.values(), key=lambda r: r.name)]
        return known + [snapshot(r) for r in sorted(self._unknown.values(), key=lambda r: -r.last_seen)]
