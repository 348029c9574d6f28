"""Which upstreams are held back, and for how long (Postfix's "dead destination").

Two kinds of connection failure, told apart by the transport (relay365.errors):
- ``UpstreamUnreachableError``: no session at all (refused, connect timeout, TLS handshake, 5xx
  greeting). Every message would fail the same way, each after up to a connect timeout, so the
  upstream's mail is held back at once (Postfix marks a destination dead after one failed cohort:
  ``destination_concurrency_failed_cohort_limit = 1``).
- ``ConnectionLostError``: the session was up and broke (a drop after DATA began, a stalled reply).
  That proves the upstream was there a moment ago: only that message is deferred, and the upstream
  is held back only after ``DROPS_BEFORE_HOLD`` such failures in a row.
Any attempt the upstream answered (delivered, 4xx or 5xx) resets the count.

Several relays on one PostgreSQL spool share what they find (a ``HoldBoard``: holds_pg.py): a hold one
node decides is published, the others adopt it on their next pass and spare themselves the connect
timeouts; ``relay365 queue retry`` clears the board with the flush. One relay alone has no board.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

log = logging.getLogger(__name__)
HOLD_SECONDS = 30.0  # the longest hold (never longer than the minimum back-off)
DROPS_BEFORE_HOLD = 3


class UpstreamHolds:
    def __init__(self, *, clock: Callable[[], float], min_backoff: float) -> None:
        self._clock = clock
        self._length = min(min_backoff, HOLD_SECONDS)
        self._until: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._fresh: dict[str, tuple[float, str]] = {}  # decided here, not yet published

    def unreachable(self, name: str, reply: str) -> None:
        self._failures[name] = self._failures.get(name, 0) + 1
        self._hold(name, f"unreachable ({reply})")

    def lost(self, name: str, reply: str) -> None:
        count = self._failures[name] = self._failures.get(name, 0) + 1
        if count >= DROPS_BEFORE_HOLD:
            self._hold(name, f"{count} connections in a row lost ({reply})")
        else:
            log.info("transport %s: connection lost (%s); only this message waits", name, reply)

    def answered(self, name: str) -> None:
        """The upstream took part in a transaction: the run of failures is over."""
        self._failures.pop(name, None)

    def _hold(self, name: str, why: str) -> None:
        now = self._clock()
        until = now + self._length
        held = self._until.get(name, 0.0)
        if held <= now:  # one warning per hold, not one per delivery that was already under way
            log.warning("transport %s %s; holding its mail for %.0fs", name, why, until - now)
        self._until[name] = max(held, until)
        self._fresh[name] = (self._until[name], why)

    def take_fresh(self) -> dict[str, tuple[float, str]]:
        """Holds decided here since the last call: (until, why) per upstream, to publish."""
        fresh, self._fresh = self._fresh, {}
        return fresh

    def adopt(self, name: str, until: float) -> None:
        """Another node holds ``name`` back until ``until``: so does this one."""
        now = self._clock()
        if until > now and until > self._until.get(name, 0.0):
            if self._until.get(name, 0.0) <= now:
                log.warning("transport %s held back by another relay for %.0fs", name, until - now)
            self._until[name] = until

    def until(self, name: str) -> float:
        """When the hold of ``name`` ends (in the past when it is not held)."""
        return self._until.get(name, 0.0)

    def held(self) -> dict[str, float]:
        now = self._clock()
        return {name: until for name, until in self._until.items() if until > now}

    def all_held(self, names: Iterable[str]) -> float | None:
        """When every one of ``names`` is held: the time the first comes back."""
        ends = [self._until.get(name, 0.0) for name in names]
        return min(ends) if ends and min(ends) > self._clock() else None

    def clear(self) -> None:
        """``relay365 queue retry`` means now (Postfix: flush also revives dead destinations)."""
        self._until.clear()
        self._failures.clear()
        self._fresh.clear()

    def forget(self, name: str) -> None:
        """A transport rebuilt by a reload (a new host, a fixed secret) starts without a hold."""
        self._until.pop(name, None)
        self._failures.pop(name, None)
        self._fresh.pop(name, None)

    def set_min_backoff(self, min_backoff: float) -> None:
        self._length = min(min_backoff, HOLD_SECONDS)


class HoldBoard(Protocol):
    """Where relays sharing a spool tell each other which upstreams are held back."""

    async def publish(self, holds: dict[str, tuple[float, str]]) -> None:
        """Upstream name -> (held until, why). ``SpoolError`` if the board cannot be reached."""

    async def current(self) -> dict[str, float]:
        """Upstream name -> held until, as every node published them (expired ones may be there)."""
        ...


class NoBoard:
    """One relay alone: nothing to share."""

    async def publish(self, holds: dict[str, tuple[float, str]]) -> None:
        return None

    async def current(self) -> dict[str, float]:
        return {}
