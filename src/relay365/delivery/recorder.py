"""Recording delivery outcomes, and what happens when the spool cannot (disk full, I/O error).

An outcome the upstream has already acted on (a message it accepted) must be neither forgotten nor
acted on again. When ``Spool.record`` fails:
1. the outcome is kept in memory and its message is not attempted again;
2. **all** delivery stops: every further attempt would reach the upstream and then fail to be
   recorded too (measured before this existed: 113 messages reached the upstream ~4,900 extra
   times in 5 minutes on a full disk);
3. the scheduler probes the spool by writing the kept outcomes, oldest first; when they are all
   written, delivery resumes.
The fault is logged once when it starts and once when it ends, and shown by ``/api/health`` and the
``relay365_delivery_stopped`` metric. The kept outcomes live only in memory: if the relay stops
before they are written, the messages concerned are delivered once more after the restart
(at-least-once, RFC 5321 section 6.1), so each reaches the upstream at most once more per fault.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from relay365.errors import SpoolError
from relay365.spool.model import Bounce, PaceEvent, RecipientUpdate, Spool

log = logging.getLogger(__name__)
PROBE_INTERVAL = 5.0  # seconds between tries while the spool cannot write (at most poll_interval)


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """What one delivery attempt of one message changed, to be written in one transaction."""

    queue_id: str
    updates: tuple[RecipientUpdate, ...]
    bounce: Bounce | None = None
    pace_events: tuple[PaceEvent, ...] = ()


class OutcomeRecorder:
    def __init__(self, *, spool: Spool) -> None:
        self._spool = spool
        self._kept: list[AttemptRecord] = []
        self._fault: str | None = None

    def stopped(self) -> str | None:
        """Why delivery is stopped (the spool's error), or None while outcomes can be recorded."""
        return self._fault

    def unrecorded(self) -> frozenset[str]:
        """Queue ids whose last outcome waits in memory: not to be attempted again."""
        return frozenset(o.queue_id for o in self._kept)

    async def record(self, outcome: AttemptRecord) -> None:
        if self._fault is not None:  # behind the outcomes already kept, in order
            self._kept.append(outcome)
            return
        try:
            await self._write(outcome)
        except SpoolError as e:
            self._kept.append(outcome)
            if self._fault is not None:  # another attempt under way at the same time found it first
                return
            self._fault = str(e)
            log.error(
                "%s: the spool cannot record this delivery outcome (%s): all delivery stopped until it"
                " can; outcomes are kept in memory meanwhile",
                outcome.queue_id,
                e,
            )

    async def recover(self) -> bool:
        """Write the kept outcomes if the spool lets us; True when delivery may go on."""
        if self._fault is None:
            return True
        written = 0
        try:
            while self._kept:
                await self._write(self._kept[0])
                self._kept.pop(0)
                written += 1
        except SpoolError as e:
            self._fault = str(e)
            if written:
                log.info("spool: %d kept outcome(s) recorded, %d still waiting", written, len(self._kept))
            return False
        log.warning("spool writes again: %d kept outcome(s) recorded; delivery resumed", written)
        self._fault = None
        return True

    def lost_on_stop(self) -> Sequence[str]:
        """Queue ids whose outcome was never written (called when the relay stops)."""
        return [o.queue_id for o in self._kept]

    async def _write(self, o: AttemptRecord) -> None:
        await self._spool.record(o.queue_id, o.updates, bounce=o.bounce, pace_events=o.pace_events)
