"""The sandbox clock: wall time plus an offset that tests move forward for the rate windows."""

from __future__ import annotations

import threading
import time


class Clock:
    """``now()`` is ``time.time()`` plus everything ``advance()`` added. Thread-safe."""

    def __init__(self, *, offset: float = 0.0) -> None:
        self._offset = offset
        self._lock = threading.Lock()

    def now(self) -> float:
        """Seconds since the epoch, as the sandbox sees them."""
        with self._lock:
            return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the sandbox's time forward (never backward)."""
        if seconds < 0:
            raise ValueError("the sandbox clock only moves forward")
        with self._lock:
            self._offset += seconds

    @property
    def offset(self) -> float:
        """How far the sandbox clock is ahead of the wall clock."""
        with self._lock:
            return self._offset


class ManualClock(Clock):
    """A sandbox clock that stands still until ``advance()`` moves it: rate windows, token lifetimes and
    the message trace's periods can then be tested without waiting and without wall-clock margins."""

    def __init__(self, *, start: float | None = None) -> None:
        super().__init__()
        self._now = time.time() if start is None else start
        self._manual = threading.Lock()

    def now(self) -> float:
        with self._manual:
            return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the sandbox clock only moves forward")
        with self._manual:
            self._now += seconds

    @property
    def offset(self) -> float:
        return self.now() - time.time()
