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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)
HOLD_SECONDS = 30.0  # the longest hold (never longer than the minimum back-off)
DROPS_BEFORE_HOLD = 3


class UpstreamHolds:
    def __init__(self, *, clock: Callable[[], float], min_backoff: float) -> None:
        self._clock = clock
        self._length = min(min_backoff, HOLD_SECONDS)
        self._until: dict[str, float] = {}
        self._failures: dict[str, int] = {}

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

    def forget(self, name: str) -> None:
        """A transport rebuilt by a reload (a new host, a fixed secret) starts without a hold."""
        self._until.pop(name, None)
        self._failures.pop(name, None)

    def set_min_backoff(self, min_backoff: float) -> None:
        self._length = min(min_backoff, HOLD_SECONDS)
