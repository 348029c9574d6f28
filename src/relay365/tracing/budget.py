"""The client-side request budget for Graph's message trace: a token bucket on a given clock.

Microsoft accepts at most 100 message trace requests per tenant in a 5-minute running window, list
and details together ("All calls to message trace or message trace detail share the same quota",
Exchange Team blog, Jan 2026; learn.microsoft.com/graph/api/messagetracingroot-list-messagetraces).
The quota is the *tenant's*: an admin's own queries and other tools count too, so relay365 keeps to
a share of it.

A bucket holding at most ``capacity`` tokens, refilled at ``rate`` tokens a second, lets through at
most ``capacity + rate * W`` requests in any window of ``W`` seconds. :meth:`TokenBucket.for_quota`
picks both so that this stays at ``share`` of the quota (80 of 100 by default): a burst of a quarter
of it at once, the rest spread over the window. After a 429 the bucket is emptied, so the client
does not come back before it has both waited ``Retry-After`` and earned a token again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenBucket:
    """``await bucket.acquire()`` before each request; ``clock`` and ``sleep`` can be replaced (tests
    drive them with a virtual clock)."""

    def __init__(
        self,
        *,
        capacity: float,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if capacity < 1 or rate <= 0:
            raise ValueError("a token bucket needs capacity >= 1 and a positive rate")
        self.capacity = float(capacity)
        self.rate = float(rate)
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(capacity)
        self._updated = clock()
        self._lock = asyncio.Lock()
        self.granted = 0

    @classmethod
    def for_quota(
        cls,
        *,
        requests: int = 100,
        window: float = 300.0,
        share: float = 0.8,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> TokenBucket:
        """A bucket that never lets more than ``share * requests`` through in any ``window``."""
        target = max(2, int(requests * share))
        capacity = max(1, target // 4)
        return cls(capacity=capacity, rate=(target - capacity) / window, clock=clock, sleep=sleep)

    def max_in_window(self, window: float) -> float:
        """The most requests this bucket can grant in any window of ``window`` seconds."""
        return self.capacity + self.rate * window

    def _refill(self) -> None:
        now = self._clock()
        if now > self._updated:
            self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
        self._updated = max(self._updated, now)

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    async def acquire(self) -> None:
        """Take one token, waiting (on ``sleep``) until there is one."""
        async with self._lock:
            while True:
                self._refill()
                if self._tokens >= 1:
                    self._tokens -= 1
                    self.granted += 1
                    return
                await self._sleep((1 - self._tokens) / self.rate)

    def drain(self) -> None:
        """Throttled by the server: start again from an empty bucket."""
        self._refill()
        self._tokens = 0.0
