"""The delivery service: transports, router, scheduler, claims and outcome recorder as one async context
manager.

::

    async with DeliveryService(settings=..., spool=..., transports=..., owner=...) as delivery:
        delivery.wake()               # new mail was committed (ingress's ``on_queued``)
        delivery.suspended()          # transports held back as unreachable
        delivery.delivery_stopped()   # why all delivery is stopped (the spool cannot record), or None
    # on the way out: deliveries in flight finish within ``grace``; those that do not are given
    # back to the spool (``Claims.give_back``), then the transports' connections are closed

Starting restores the pacing windows from the spool (Exchange Online's per-mailbox limits survive a
restart) and starts the scheduler task. The transports are handed over by the composition root (built
from the registry by the preflight, ``transports/registry.py``): the service closes each one when it
stops, also when it fails to start, and empties the mapping it was given.

A reload (``reload``) puts the new routes, delivery settings and changed transports in place for every
attempt that starts from then on. A transport that was replaced or removed takes no new delivery; the
deliveries it carries finish on it, then it is closed (its connections to the old upstream end with
QUIT). Transports that did not change keep running: their connections, tokens and pacing stay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Protocol, Self

from relay365.delivery.holds import HoldBoard
from relay365.delivery.pacestore import PaceStore
from relay365.delivery.pacing import Headroom
from relay365.delivery.router import NoRoute, Router
from relay365.delivery.scheduler import Scheduler
from relay365.observability.metrics import Metrics
from relay365.observability.tracking import TrackingLog
from relay365.settings import Settings
from relay365.spool.contract import Spool
from relay365.transports.base import PacedTransport, Transport
from relay365.transports.registry import null_sender_transports, recipient_rules

log = logging.getLogger(__name__)


class DeliveryStatus(Protocol):
    """What the rest of the relay may read of running delivery (the console, the metrics, the
    watchdog), and the one thing it may ask of it: look at the queue now."""

    @property
    def transports(self) -> Mapping[str, Transport]:
        """Transport name -> transport (an OAuth one tells its token's state)."""
        ...

    def running(self) -> bool:
        """False once the scheduler has stopped by itself (systemd's watchdog then restarts)."""
        ...

    def suspended(self) -> dict[str, float]:
        """Transports held back as unreachable, with the time their hold ends."""
        ...

    def delivery_stopped(self) -> str | None:
        """Why all delivery is stopped (the spool cannot record outcomes), or None."""
        ...

    async def headroom(self, transport: PacedTransport) -> Headroom:
        """How much a paced transport's mailbox may still send now (shared pacing: across nodes)."""
        ...

    def wake(self, queue_id: str = "") -> None:
        """Look at the queue now (new, released or retried mail)."""
        ...

    def refresh_metrics(self) -> None:
        """Set delivery's gauges (held-back transports, delivery stopped) before a scrape."""
        ...


class DeliveryService:
    def __init__(
        self,
        *,
        settings: Settings,
        spool: Spool,
        transports: dict[str, Transport],
        owner: str,
        metrics: Metrics,
        tracking: TrackingLog,
        clock: Callable[[], float] = time.time,
        explain: Callable[[str], str | None] = lambda reply: None,
        pace: PaceStore | None = None,
        holds_board: HoldBoard | None = None,
    ) -> None:
        """``owner``: this process to the spool's claims (``recover`` was called with it);
        ``explain(reply)``: the hint a DSN gives for a reply (the reply-code catalogue); ``pace`` and
        ``holds_board``: what this relay shares with others on the same spool (service/sharing.py;
        default: in this process)."""
        s = settings
        self._transports = transports
        self._metrics = metrics
        self.router = Router(s.routes, accepts=recipient_rules(s), null_sender=null_sender_transports(s))
        self.scheduler = Scheduler(
            spool=spool,
            router=self.router,
            transports=transports,
            settings=s.delivery,
            hostname=s.server.hostname,
            clock=clock,
            explain=explain,
            metrics=metrics,
            tracking=tracking,
            owner=owner,
            pace=pace,
            holds_board=holds_board,
        )
        # how long deliveries in flight get to finish at shutdown (``Relay.stop(grace=)`` may change it)
        self.grace = s.server.shutdown_grace
        self._task: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        try:
            await self.scheduler.load_pacing()
        except BaseException:
            await self._close_transports()
            raise
        self._task = asyncio.create_task(self.scheduler.run(), name="scheduler")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.scheduler.stop(grace=self.grace)
        finally:
            if self._task is not None:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            # replaced transports close once their last delivery is over: the scheduler stopped them all
            await asyncio.gather(*self._retiring, return_exceptions=True)
            await self._close_transports()

    # -- reload ----------------------------------------------------------------------------------------
    def reload(self, settings: Settings, changed: Mapping[str, Transport]) -> list[str]:
        """From now on: ``settings``' routes and delivery settings; ``changed`` (built from ``settings``)
        replaces or adds those transports, the others of ``settings`` keep running, and transports no
        longer configured are removed. Returns the names retired (replaced or removed)."""
        s = settings
        running = self._transports
        keep = {t.name: changed[t.name] if t.name in changed else running[t.name] for t in s.transports}
        retired = [(n, t) for n, t in self._transports.items() if keep.get(n) is not t]
        self.router = Router(s.routes, accepts=recipient_rules(s), null_sender=null_sender_transports(s))
        self._transports.clear()  # the scheduler's own mapping: changed in place, in one step
        self._transports.update(keep)
        self.scheduler.reconfigure(
            router=self.router, settings=s.delivery, hostname=s.server.hostname, rebuilt=changed
        )
        self.grace = s.server.shutdown_grace
        for name, transport in retired:
            task = asyncio.create_task(self._retire(name, transport), name=f"retire-{name}")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return [name for name, _ in retired]

    async def _retire(self, name: str, transport: Transport) -> None:
        """Close a replaced transport once no delivery uses it."""
        busy = self.scheduler.in_use.in_use(transport)
        if busy:
            log.info("transport %s: replaced; closing it after its %d delivery(ies) in flight", name, busy)
        await self.scheduler.in_use.idle(transport)
        try:
            await transport.close()
        except Exception:
            log.exception("closing the replaced transport %s failed", name)

    async def _close_transports(self) -> None:
        for transport in self._transports.values():
            try:
                await transport.close()
            except Exception:  # one transport's failing close must not keep the others open
                log.exception("closing a transport failed")
        self._transports.clear()

    # -- status ----------------------------------------------------------------------------------------
    @property
    def transports(self) -> dict[str, Transport]:
        return self._transports

    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def suspended(self) -> dict[str, float]:
        return self.scheduler.suspended()

    def delivery_stopped(self) -> str | None:
        return self.scheduler.delivery_stopped()

    async def headroom(self, transport: PacedTransport) -> Headroom:
        return await self.scheduler.headroom(transport)

    def wake(self, queue_id: str = "") -> None:
        self.scheduler.wake(queue_id)

    def refresh_metrics(self) -> None:
        held = self.suspended()
        for name in self._transports:
            self._metrics.suspended.labels(name).set(1 if name in held else 0)
        self._metrics.delivery_stopped.set(0 if self.delivery_stopped() is None else 1)

    def route_reply(self, sender: str, rcpt: str, device: str) -> str | None:
        """For ingress: the reply refusing at RCPT a recipient of mail from <> (RFC 5321 4.5.5) that no
        route can carry, since no bounce could ever tell the device (README, "The null sender"); or None."""
        try:
            self.router.choose(rcpt=rcpt, sender=sender, device=device, size=0)
        except NoRoute as e:
            return f"550 5.7.1 {e}"
        return None
