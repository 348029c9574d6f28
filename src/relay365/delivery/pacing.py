"""Pacing per upstream mailbox or app, so Microsoft never has to throttle us.

Exchange Online's limits (exchange-online.md): SMTP AUTH 30 messages/minute, 10,000 recipients per
rolling 24 hours and 3 concurrent connections per mailbox; Graph 4 concurrent requests per mailbox and
10,000 requests per 10 minutes per app and mailbox. A message over a limit is not rejected and not
counted as a failed attempt: it stays queued and becomes due exactly when the window allows it.
Throttling replies (432 4.3.2, 451 4.7.5xx, 554 5.2.0, Graph 429) pause the mailbox further.
The sent-message history is persisted with the delivery outcome, so the windows survive a restart.

The limits hold for the mailbox, not for the relay: where several relays share one PostgreSQL spool,
the windows, sessions and pauses live there (delivery/pacestore_pg.py). Both decide with the same
pure function, ``wait_for``; the ``PaceStore`` seam (delivery/pacestore.py) is what the scheduler uses.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from relay365.spool.model import PaceEvent
from relay365.transports.base import PaceLimits


@dataclass(slots=True)
class Slot:
    """A message on its way: counted in the windows from ``begin`` until ``end`` settles it."""

    key: str
    entry: list[float]  # [time, recipients], shared with the pacer's history


class Pacer:
    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._events: dict[str, deque[list[float]]] = {}
        self._active: dict[str, int] = {}
        self._paused_until: dict[str, float] = {}

    def load(self, events: Iterable[PaceEvent]) -> None:
        for e in sorted(events, key=lambda e: e.at):
            self._events.setdefault(e.key, deque()).append([e.at, float(e.recipients)])

    def _history(self, key: str, limits: PaceLimits, now: float) -> deque[list[float]]:
        q = self._events.setdefault(key, deque())
        while q and q[0][0] <= now - limits.day:
            q.popleft()
        return q

    def wait_time(self, key: str, limits: PaceLimits, recipients: int) -> float:
        """0 when a message with ``recipients`` recipients may go now, else seconds to wait.
        Messages still in flight count: they may reach Microsoft at any moment."""
        now = self._clock()
        q = self._history(key, limits, now)
        return wait_for(
            now=now,
            limits=limits,
            recipients=recipients,
            sent=[(t, n) for t, n in q],
            active=self._active.get(key, 0),
            paused_until=self._paused_until.get(key, 0.0),
        )

    def begin(self, key: str, recipients: int) -> Slot:
        self._active[key] = self._active.get(key, 0) + 1
        entry = [self._clock(), float(recipients)]
        self._events.setdefault(key, deque()).append(entry)
        return Slot(key, entry)

    def end(self, slot: Slot, *, delivered: int) -> PaceEvent | None:
        """Settle a message: counted (at the time it was accepted) if anything was delivered."""
        self._active[slot.key] = max(0, self._active.get(slot.key, 0) - 1)
        if not delivered:
            with contextlib.suppress(ValueError):
                self._events[slot.key].remove(slot.entry)
            return None
        slot.entry[0], slot.entry[1] = self._clock(), float(delivered)
        return PaceEvent(slot.key, slot.entry[0], delivered)

    def pause(self, key: str, seconds: float) -> None:
        until = self._clock() + seconds
        self._paused_until[key] = max(until, self._paused_until.get(key, 0.0))

    def active(self, key: str) -> int:
        return self._active.get(key, 0)

    def headroom(self, key: str, limits: PaceLimits) -> Headroom:
        """What ``key`` may still send now (read-only: the console's pacing column)."""
        now = self._clock()
        q = self._history(key, limits, now)
        return headroom_of(
            now=now,
            limits=limits,
            sent=[(t, n) for t, n in q],
            active=self._active.get(key, 0),
            paused_until=self._paused_until.get(key, 0.0),
        )


SESSION_WAIT = 0.2  # all sessions busy: one ends soon (in this process it also wakes the scheduler)


def wait_for(
    *,
    now: float,
    limits: PaceLimits,
    recipients: int,
    sent: Iterable[tuple[float, float]],
    active: int,
    paused_until: float,
) -> float:
    """0 when a message with ``recipients`` recipients may go at ``now``, else seconds to wait, given
    the messages ``sent`` in the last day as (time, recipients) (those in flight included, at the
    time they started), the sessions ``active`` and a pause after a throttling reply."""
    waits = [paused_until - now]
    if active >= limits.concurrency:
        waits.append(SESSION_WAIT)
    day = sorted((t, n) for t, n in sent if t > now - limits.day)
    in_window = [t for t, _ in day if t > now - limits.window]
    if len(in_window) >= limits.messages_per_window:
        # The oldest message of the window must leave it before another may go.
        waits.append(in_window[-limits.messages_per_window] + limits.window - now)
    total = sum(n for _, n in day)
    if total + recipients > limits.recipients_per_day and day:
        # Wait until enough of the oldest recipients have left the rolling day.
        excess = total + recipients - limits.recipients_per_day
        freed = 0.0
        for t, n in day:
            freed += n
            if freed >= excess:
                waits.append(t + limits.day - now)
                break
    return max(0.0, *waits)


def headroom_of(
    *, now: float, limits: PaceLimits, sent: Iterable[tuple[float, float]], active: int, paused_until: float
) -> Headroom:
    day = [(t, n) for t, n in sent if t > now - limits.day]
    in_window = sum(1 for t, _ in day if t > now - limits.window)
    return Headroom(
        messages_left=max(0, limits.messages_per_window - in_window),
        recipients_left=max(0, limits.recipients_per_day - int(sum(n for _, n in day))),
        sessions_in_use=active,
        paused_until=max(paused_until, 0.0),
    )


@dataclass(frozen=True, slots=True)
class Headroom:
    messages_left: int  # in the current window
    recipients_left: int  # in the rolling day
    sessions_in_use: int
    paused_until: float  # 0: not paused by a throttling reply


def is_throttle_reply(reply: str) -> bool:
    """Replies that mean "slow down" rather than "this message is bad"."""
    r = reply.strip()
    return (
        r.startswith(("432 4.3.2", "429"))
        or (r.startswith("451 4.7.5") or r.startswith("451 4.7.6"))
        or r.startswith("554 5.2.0")
        or "SubmissionQuotaExceeded" in r
    )
