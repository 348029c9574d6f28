"""This process's claims on the messages it delivers (the spool's claims and leases, contract.py).

The scheduler takes due messages with ``Spool.claim`` as one owner (unique per process incarnation),
so several processes on one spool never deliver the same message at once. While a delivery runs its
lease is renewed every third of the lease; the outcome ends the claim (``Spool.record``). A process
that dies leaves its claims to expire (or to ``recover``, which sees it is dead at once); one that is
stopped gives the unfinished ones back (``release``) so the next owner need not wait for the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from relay365.errors import SpoolError
from relay365.spool.contract import Spool
from relay365.spool.model import QueueEntry

log = logging.getLogger(__name__)


class Claims:
    def __init__(self, *, spool: Spool, owner: str, lease: float, clock: Callable[[], float]) -> None:
        self._spool = spool
        self.owner = owner
        self.lease = lease
        self._clock = clock
        self._active: set[str] = set()

    def active(self) -> int:
        """How many claimed messages are being delivered now."""
        return len(self._active)

    async def take(self, *, now: float, limit: int) -> list[QueueEntry]:
        """Claim up to ``limit`` due messages; those this process is already delivering (its own
        lease looked expired to a clock that jumped) are left to the delivery under way."""
        got = await self._spool.claim(owner=self.owner, now=now, limit=limit, lease=self.lease)
        fresh = [e for e in got if e.queue_id not in self._active]
        self._active.update(e.queue_id for e in fresh)
        return fresh

    def done(self, queue_id: str) -> None:
        """The delivery is over (its outcome ended the claim, or it is kept in memory)."""
        self._active.discard(queue_id)

    async def cool_down(self, queue_id: str, until: float) -> None:
        """Keep the claim until ``until`` without delivering: no process retries the message before
        then (the last resort when an attempt could not even be settled). If the spool cannot
        write, the lease still ends it a little earlier."""
        self._active.discard(queue_id)
        with contextlib.suppress(SpoolError):
            await self._spool.renew([queue_id], owner=self.owner, until=until)

    async def give_back(self, queue_id: str) -> None:
        """A delivery stopped without an outcome (shutdown): the message is due again at once."""
        self._active.discard(queue_id)
        try:
            await self._spool.release(queue_id, owner=self.owner)
        except SpoolError as e:
            log.warning("%s: claim not given back (%s); it expires after %.0fs", queue_id, e, self.lease)

    async def keep_renewed(self) -> None:
        """Renew the claims of running deliveries every third of the lease, until cancelled."""
        while True:
            await asyncio.sleep(self.lease / 3)
            ids = sorted(self._active)
            if not ids:
                continue
            try:
                held = await self._spool.renew(ids, owner=self.owner, until=self._clock() + self.lease)
            except SpoolError as e:
                log.warning("claims of %d running deliveries not renewed: %s", len(ids), e)
                continue
            lost = [i for i in ids if i not in held and i in self._active]
            if lost:
                log.warning(
                    "claim lost on %s (another process took it over after the lease ran out, or the"
                    " message was deleted); its outcome will not be recorded here",
                    " ".join(lost),
                )
