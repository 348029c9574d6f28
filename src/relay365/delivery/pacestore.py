"""The pacing seam: where the per-mailbox windows, sessions and pauses live.

Microsoft's limits hold for the mailbox, not for the relay that sends (exchange-online.md: SMTP AUTH
30 messages/minute, 10,000 recipients per rolling 24 hours and 3 concurrent connections per mailbox;
Graph 4 concurrent requests per mailbox). One relay keeps them in memory (``LocalPaceStore``, over
``Pacer``; the history is persisted with each outcome and reloaded at start). Several relays on one
PostgreSQL spool keep them in the database (``PgPaceStore``, pacestore_pg.py), so together they never
send faster than one would.

``reserve`` is atomic: it decides with ``pacing.wait_for`` and, when the message may go, takes a
session slot and counts the message in the windows at once (no two nodes take the last slot).
``settle`` ends the slot; a message that reached the upstream stays counted, at the time it was
accepted. A slot of a node that died expires (``SESSION_LEASE``) instead of leaking.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from relay365.delivery.pacing import Headroom, Pacer, Slot
from relay365.spool.contract import Spool
from relay365.spool.model import PaceEvent
from relay365.transports.base import PaceLimits

SESSION_LEASE = 120.0  # a shared session slot not renewed for this long belonged to a dead node


@dataclass(frozen=True, slots=True)
class Reservation:
    """A message allowed to go now: one session slot and one place in the windows, until settled."""

    key: str
    recipients: int
    handle: object  # the store's own (LocalPaceStore: the Pacer's Slot; PgPaceStore: the row id)


class PaceStore(Protocol):
    """Pacing state for every upstream mailbox/app this relay sends as."""

    shared: bool  # True when other relays pace against the same state (their sessions count too)

    async def restore(self, spool: Spool) -> None:
        """Load what must survive a restart (the history, from the spool) before the first reserve."""

    async def reserve(self, key: str, limits: PaceLimits, recipients: int) -> Reservation | float:
        """A ``Reservation`` when a message with ``recipients`` recipients may go now, else how many
        seconds to wait. ``SpoolError`` when the shared state cannot be reached (nothing was taken)."""
        ...

    async def settle(self, reservation: Reservation, *, delivered: int) -> PaceEvent | None:
        """End the reservation; ``delivered`` recipients reached the upstream (0: the message does
        not count). Returns the event the spool must record with the outcome (None when the store
        has recorded it itself). Never raises."""
        ...

    async def pause(self, key: str, seconds: float) -> None:
        """The upstream throttled ``key``: nobody sends as it for ``seconds``."""

    async def headroom(self, key: str, limits: PaceLimits) -> Headroom:
        """What ``key`` may still send now (read-only, for the console)."""
        ...

    async def close(self) -> None:
        """Stop background work (slot renewals); reservations not settled expire."""


class LocalPaceStore:
    """This process's own windows (one relay per spool: SQLite or memory)."""

    shared = False

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.pacer = Pacer(clock=clock)

    async def restore(self, spool: Spool) -> None:
        self.pacer.load(await spool.pace_events(self._clock() - 86_400.0))

    async def reserve(self, key: str, limits: PaceLimits, recipients: int) -> Reservation | float:
        wait = self.pacer.wait_time(key, limits, recipients)
        if wait > 0:
            return wait
        return Reservation(key, recipients, self.pacer.begin(key, recipients))

    async def settle(self, reservation: Reservation, *, delivered: int) -> PaceEvent | None:
        assert isinstance(reservation.handle, Slot)
        return self.pacer.end(reservation.handle, delivered=delivered)

    async def pause(self, key: str, seconds: float) -> None:
        self.pacer.pause(key, seconds)

    async def headroom(self, key: str, limits: PaceLimits) -> Headroom:
        return self.pacer.headroom(key, limits)

    async def close(self) -> None:
        return None
