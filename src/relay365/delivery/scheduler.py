"""The scheduler (Postfix's qmgr): picks due recipients, groups them per route, hands each group to
its transport, and records the outcome per recipient: delivered, deferred with back-off, or bounced
with exactly one DSN per failed attempt.

Transports raise the ``DeliveryError`` family. Anything else escaping an attempt (a transport's bug,
an unreadable message file, a failing DSN hint) is logged with its traceback and recorded like a 4xx:
``451 4.3.0 internal error: <type>: <text>`` on each recipient it left without an outcome, with the
normal back-off and queue lifetime, ending in one DSN. Nothing retries silently.
The decisions (which recipients, which route, what a result means) are pure functions in plan.py;
this module does the I/O around them. Outcomes are written through the ``OutcomeRecorder``, which
stops all delivery while the spool cannot record them (recorder.py); unreachable upstreams are
held back by ``UpstreamHolds``.

Messages are taken with the spool's claims (``Claims``: one owner per process, leases renewed while
a delivery runs), so several processes on one spool never deliver the same message at once. The
scheduler sleeps until the next message is due, or until the spool reports a change
(``Spool.wait_changed``: new mail, a release, ``relay365 queue retry`` from any process).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from relay365.delivery import plan
from relay365.delivery.claims import Claims
from relay365.delivery.dsn import Failure, build_dsn, original_headers
from relay365.delivery.holds import HoldBoard, NoBoard, UpstreamHolds
from relay365.delivery.inuse import TransportUse
from relay365.delivery.pacestore import LocalPaceStore, PaceStore, Reservation
from relay365.delivery.pacing import Headroom
from relay365.delivery.plan import internal_reply
from relay365.delivery.recorder import PROBE_INTERVAL, AttemptRecord, OutcomeRecorder
from relay365.delivery.router import Router
from relay365.errors import (
    ConnectionLostError,
    PermanentDeliveryError,
    SpoolError,
    TransientDeliveryError,
    UpstreamUnreachableError,
)
from relay365.observability.metrics import Metrics
from relay365.observability.tracking import EventKind, MemoryTrackingLog, TrackingEvent, TrackingLog
from relay365.settings import DeliverySettings
from relay365.spool.contract import Spool
from relay365.spool.model import (
    BodySource,
    Bounce,
    Envelope,
    PaceEvent,
    QueueEntry,
    RcptState,
    Recipient,
    RecipientUpdate,
    new_owner_id,
)
from relay365.spool.wire import stuff, unstuff
from relay365.transports.base import (
    OutboundMessage,
    Outcome,
    PacedTransport,
    RecipientResult,
    SessionHolder,
    Transport,
)

log = logging.getLogger(__name__)
HOLDS_READ_EVERY = 1.0  # seconds between reads of the other relays' hold-backs


@dataclass
class _Attempt:
    """What one delivery attempt of one message has settled so far."""

    entry: QueueEntry
    due: list[Recipient]
    updates: list[RecipientUpdate] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    events: list[PaceEvent] = field(default_factory=list)

    def unsettled(self) -> list[Recipient]:
        done = {u.rcpt for u in self.updates}
        return [r for r in self.due if r.rcpt not in done]


class Scheduler:
    def __init__(
        self,
        *,
        spool: Spool,
        router: Router,
        transports: Mapping[str, Transport],
        settings: DeliverySettings,
        hostname: str,
        clock: Callable[[], float] = time.time,
        explain: Callable[[str], str | None] = lambda reply: None,
        metrics: Metrics | None = None,
        tracking: TrackingLog | None = None,
        owner: str | None = None,
        pace: PaceStore | None = None,
        holds_board: HoldBoard | None = None,
    ) -> None:
        """``owner``: who this process is to the spool (``recover`` was called with it); a new one
        if not given. ``pace`` and ``holds_board``: where pacing and hold-backs live when several
        relays share the spool (in this process if not given)."""
        self._spool = spool
        self._tracking: TrackingLog = tracking or MemoryTrackingLog()
        self._metrics = metrics or Metrics()
        self._router = router
        self._transports = transports
        self._settings = settings
        self._hostname = hostname
        self._clock = clock
        self._explain = explain
        self._wake = asyncio.Event()
        self._claims = Claims(spool=spool, owner=owner or new_owner_id(), lease=settings.lease, clock=clock)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._stopping = False
        self._pace: PaceStore = pace or LocalPaceStore(clock=clock)
        self._holds = UpstreamHolds(clock=clock, min_backoff=settings.min_backoff)
        self._board: HoldBoard = holds_board or NoBoard()
        self._holds_read = -HOLDS_READ_EVERY
        self._recorder = OutcomeRecorder(spool=spool, owner=self._claims.owner)
        self._flush_seen = spool.flush_generation()
        self.in_use = TransportUse()

    def reconfigure(
        self, *, router: Router, settings: DeliverySettings, hostname: str, rebuilt: Iterable[str] = ()
    ) -> None:
        """A reload: the routes, limits and back-off for every attempt from now on (the transports
        mapping is the caller's, changed in place); ``rebuilt`` transports start without a hold.
        Deliveries under way finish as they began; the pacing windows are kept (they count per
        mailbox, whichever transport object sends)."""
        self._router, self._settings, self._hostname = router, settings, hostname
        self._claims.lease = settings.lease
        self._holds.set_min_backoff(settings.min_backoff)
        for name in rebuilt:
            self._holds.forget(name)
        self._wake.set()

    @property
    def owner(self) -> str:
        return self._claims.owner

    def wake(self, queue_id: str = "") -> None:
        self._wake.set()

    async def load_pacing(self) -> None:
        """Restore the pacing windows from the spool (they survive a restart)."""
        await self._pace.restore(self._spool)

    async def run(self) -> None:
        self._background = [
            asyncio.create_task(self._watch(), name="spool-watch"),
            asyncio.create_task(self._claims.keep_renewed(), name="lease-renewal"),
        ]
        try:
            while not self._stopping:
                try:
                    if await self._recorder.recover():
                        await self.run_once()
                    if self._recorder.stopped() is None:
                        timeout = await self._sleep_time()
                    else:  # the spool cannot record outcomes or claims: probe it again soon
                        timeout = min(self._settings.poll_interval, PROBE_INTERVAL)
                except Exception:
                    log.exception("scheduler pass failed; retrying after the poll interval")
                    timeout = self._settings.poll_interval
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):  # (not wait_for: it may swallow a cancel)
                        await self._wake.wait()
                self._wake.clear()
        finally:
            if not self._stopping:  # cancelled without stop(): the watcher and renewals go too
                await self._stop_background()

    async def _stop_background(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background = []

    async def _watch(self) -> None:
        """Wake the scheduler when the spool changes (this process or another one)."""
        poll = self._settings.poll_interval
        while True:
            try:
                changed = await self._spool.wait_changed(poll)
            except Exception as e:  # the scheduler's own pass reports spool faults
                log.debug("spool wake-up failed: %s", e)
                await asyncio.sleep(min(poll, PROBE_INTERVAL))
                continue
            if changed:
                self._check_flush()
                self._wake.set()

    def _check_flush(self) -> None:
        generation = self._spool.flush_generation()
        if generation != self._flush_seen:
            # "queue retry" means now: forget which upstreams were held back (Postfix: flush dead).
            self._flush_seen = generation
            self._holds.clear()

    async def _sleep_time(self) -> float:
        poll = self._settings.poll_interval
        if self._claims.active() >= self._settings.concurrency:
            return poll
        nxt = await self._spool.next_due_time()
        back = self._holds.all_held(self._transports)
        if back is not None:
            nxt = back if nxt is None else max(nxt, back)
        if nxt is None:
            return poll
        return max(0.05, min(poll, nxt - self._clock()))

    async def headroom(self, transport: PacedTransport) -> Headroom:
        """Pacing headroom of a paced transport's mailbox (read-only, for the console)."""
        return await self._pace.headroom(transport.pacing_key, transport.pacing)

    def suspended(self) -> dict[str, float]:
        """Transports held back as unreachable, with the time their hold ends."""
        return self._holds.held()

    def delivery_stopped(self) -> str | None:
        """Why all delivery is stopped (the spool cannot record outcomes), or None."""
        return self._recorder.stopped()

    async def run_once(self) -> int:
        """Start delivery of every due entry that fits the concurrency; return how many started."""
        free = self._settings.concurrency - self._claims.active()
        if free <= 0 or self._stopping or self._recorder.holding():
            return 0
        self._check_flush()
        await self._sync_holds()
        if self._holds.all_held(self._transports) is not None:
            return 0
        try:
            entries = await self._claims.take(now=self._clock(), limit=free)
        except SpoolError as e:
            self._recorder.claim_failed(e)
            return 0
        self._recorder.claim_worked()
        for entry in entries:
            task = asyncio.create_task(self._deliver(entry), name=f"deliver-{entry.queue_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(entries)

    async def _sync_holds(self) -> None:
        """Publish the hold-backs decided here, adopt those of the other relays (a shared spool; read
        at most every ``HOLDS_READ_EVERY`` seconds)."""
        try:
            fresh = self._holds.take_fresh()
            if fresh:
                await self._board.publish(fresh)
            if time.monotonic() - self._holds_read < HOLDS_READ_EVERY:
                return
            self._holds_read = time.monotonic()
            for name, until in (await self._board.current()).items():
                if name in self._transports:
                    self._holds.adopt(name, until)
        except SpoolError as e:
            log.debug("hold-backs not shared now: %s", e)

    async def drain(self) -> None:
        """Wait until every delivery started so far has finished (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self, *, grace: float = 30.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._tasks:
            _done, pending = await asyncio.wait(list(self._tasks), timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        await self._stop_background()
        await self._pace.close()
        if not await self._recorder.recover():
            lost = self._recorder.lost_on_stop()
            log.error(
                "stopping with %d delivery outcome(s) the spool could not record (%s); these messages"
                " will be delivered once more after the restart: %s",
                len(lost),
                self._recorder.stopped(),
                " ".join(lost),
            )

    async def _deliver(self, entry: QueueEntry) -> None:
        ok = False
        now = self._clock()
        attempt = _Attempt(entry, plan.due_recipients(entry, now))
        try:
            try:
                await self._attempt(attempt, now)
            except Exception as e:  # a bug: this attempt fails like a 4xx, visibly
                log.exception("%s: delivery attempt failed with an internal error", entry.queue_id)
                reply = internal_reply(e)
                for r in attempt.unsettled():
                    res = RecipientResult(r.rcpt, Outcome.TRANSIENT, reply)
                    attempt.updates.append(self._settle(entry, res, r.attempts, attempt.failures))
            bounce = await self._bounce(entry, attempt.failures)
            await self._recorder.record(
                AttemptRecord(entry.queue_id, tuple(attempt.updates), bounce, tuple(attempt.events))
            )
            ok = True
            for u in attempt.updates:
                if u.counts_attempt:
                    self._track(entry, _OUTCOME_EVENTS[u.state], u.rcpt, u.transport, reply=u.reply)
        except asyncio.CancelledError:  # stopped mid-attempt: at-least-once, the next owner sends it
            ok = True  # no cool-down: the claim is given back
            await self._claims.give_back(entry.queue_id)
            raise
        except Exception:  # last resort (the DSN or the record itself is broken): a cool-down
            log.exception("delivery of %s failed unexpectedly; retrying after cool-down", entry.queue_id)
        finally:
            if not ok:  # keep the claim through the cool-down: no process retries it before then
                await self._claims.cool_down(entry.queue_id, self._clock() + self._settings.min_backoff)
            self._claims.done(entry.queue_id)
            self._wake.set()

    def _route(self, entry: QueueEntry, due: list[Recipient]) -> plan.RoutePlan:
        routes = plan.route(self._router, entry, due)
        for _rcpt, why in routes.unroutable:
            log.warning("%s: %s", entry.queue_id, why)
        for rcpt, choice in routes.choices:
            self._track(
                entry, EventKind.ROUTED, rcpt, choice.transport, detail=f"{choice.route}: {choice.reason}"
            )
        return routes

    async def _send(self, transport: Transport, entry: QueueEntry, rcpts: list[str]) -> list[RecipientResult]:
        message = OutboundMessage(
            queue_id=entry.queue_id,
            mail_from=entry.envelope.mail_from,
            rcpt_tos=tuple(rcpts),
            body=BodySource(
                entry.queue_id, entry.size, functools.partial(self._spool.body, entry), entry.stuffed
            ),
            size=entry.size,
            smtputf8=entry.envelope.smtputf8,
        )
        try:
            with self.in_use.using(transport):  # a reload closes a replaced transport after this
                results = await transport.deliver(message)
        except UpstreamUnreachableError as e:
            self._holds.unreachable(transport.name, e.reply)
            return plan.results_for_error(rcpts, e)
        except ConnectionLostError as e:
            self._holds.lost(transport.name, e.reply)
            return plan.results_for_error(rcpts, e)
        except (TransientDeliveryError, PermanentDeliveryError) as e:
            self._holds.answered(transport.name)
            return plan.results_for_error(rcpts, e)
        except Exception as e:  # not the contract: a bug in the transport, recorded as this attempt's
            log.exception("%s: transport %s raised an internal error", entry.queue_id, transport.name)
            return plan.results_for_bug(rcpts, e)
        self._holds.answered(transport.name)
        return plan.complete(rcpts, results)

    async def _attempt(self, attempt: _Attempt, now: float) -> None:
        entry = attempt.entry
        routes = self._route(entry, attempt.due)
        states = {r.rcpt: r for r in entry.recipients}
        updates, failures, events = attempt.updates, attempt.failures, attempt.events
        bounced, no_route = routes.no_route()
        updates += bounced
        failures += no_route
        pending = [(g.transport, g.fallbacks, list(g.rcpts)) for g in routes.groups]
        while pending:
            name, fallbacks, rcpts = pending.pop(0)
            transport = self._transports.get(name)
            if transport is None:  # removed by a reload after the route was chosen: routed again now
                updates += plan.postponed(entry, rcpts, now)
                continue
            paced = transport if isinstance(transport, PacedTransport) else None
            held_until = self._holds.until(name)
            if held_until > now:
                updates += plan.postponed(entry, rcpts, held_until)
                continue
            reservation: Reservation | None = None
            if paced is not None:
                try:
                    got = await self._pace.reserve(paced.pacing_key, paced.pacing, len(rcpts))
                except SpoolError as e:  # the shared pacing state is out of reach: not a failure either
                    log.warning("%s: pacing of %s unavailable: %s", entry.queue_id, paced.pacing_key, e)
                    got = PROBE_INTERVAL
                if not isinstance(got, Reservation):
                    # Not a failure: the recipients stay as they are and become due when allowed.
                    reply = f"paced: {paced.pacing_key} is at its limit, next try in {got:.1f}s"
                    updates += plan.postponed(entry, rcpts, max(now, self._clock()) + got, reply=reply)
                    continue
                reservation = got
            for r in rcpts:
                self._track(entry, EventKind.ATTEMPTED, r, name)
            results: list[RecipientResult] = []
            try:
                results = await self._send(transport, entry, rcpts)
            finally:
                if reservation is not None:
                    if self._pace.shared and isinstance(transport, SessionHolder):
                        await transport.release_idle()  # the slot ends with the session (base.py)
                    delivered = sum(1 for r in results if r.outcome is Outcome.DELIVERED)
                    if (event := await self._pace.settle(reservation, delivered=delivered)) is not None:
                        events.append(event)
            if paced is not None:
                await self._slow_down(paced, results)
            for res in results:
                self._metrics.results.labels(name, res.outcome.value).inc()
                log.info(
                    "%s to=<%s> via=%s outcome=%s reply=%r",
                    entry.queue_id,
                    res.rcpt,
                    name,
                    res.outcome.value,
                    res.reply,
                )
            retry, final = plan.split_fallback(results, fallbacks)
            for res in final:
                update = self._settle(entry, res, states[res.rcpt].attempts, failures)
                updates.append(replace(update, transport=name))
            if retry:
                log.warning(
                    "%s: %s refused %d recipient(s); falling back to %s",
                    entry.queue_id,
                    name,
                    len(retry),
                    fallbacks[0],
                )
                pending.append((fallbacks[0], fallbacks[1:], retry))

    def _track(
        self,
        entry: QueueEntry,
        kind: EventKind,
        rcpt: str,
        transport: str,
        *,
        reply: str = "",
        detail: str = "",
    ) -> None:
        env = entry.envelope
        self._tracking.record(
            TrackingEvent(
                kind=kind,
                at=self._clock(),
                queue_id=entry.queue_id,
                message_id=env.message_id,
                subject=env.subject,
                sender=env.mail_from,
                recipient=rcpt,
                device=env.device,
                peer=env.peer,
                listener=env.listener,
                transport=transport,
                reply=reply,
                detail=detail,
            )
        )

    async def _slow_down(self, paced: PacedTransport, results: list[RecipientResult]) -> None:
        """A throttling reply pauses the mailbox (Retry-After, or one window)."""
        if (pause := plan.throttle_pause(results, paced.pacing.window)) is not None:
            seconds, reply = pause
            log.warning("%s: upstream throttles (%s); pausing it %.0fs", paced.pacing_key, reply, seconds)
            await self._pace.pause(paced.pacing_key, seconds)

    def _settle(
        self, entry: QueueEntry, res: RecipientResult, attempts: int, failures: list[Failure]
    ) -> RecipientUpdate:
        update, failure = plan.settle(
            res, attempts=attempts, received_at=entry.received_at, now=self._clock(), settings=self._settings
        )
        if failure is not None:
            failures.append(failure)
        return update

    async def _bounce(self, entry: QueueEntry, failures: list[Failure]) -> Bounce | None:
        if not failures:
            return None
        sender = plan.bounce_to(entry, failures)
        if sender is None:
            log.warning(
                "%s: not bouncing a message from <> (%d failed recipient(s))", entry.queue_id, len(failures)
            )
            return None
        try:
            async with self._spool.body(entry) as reader:
                head = await reader.read(64 * 1024)
            headers = original_headers(unstuff(head) if entry.stuffed else head)
        except SpoolError as e:
            log.warning("%s: the DSN goes without the original headers: %s", entry.queue_id, e)
            headers = b""

        def dsn(headers: bytes, explain: Callable[[str], str | None]) -> bytes:
            return build_dsn(
                hostname=self._hostname,
                queue_id=entry.queue_id,
                original_sender=sender,
                arrival=entry.received_at,
                failures=failures,
                headers=headers,
                explain=explain,
            )

        try:
            body = dsn(headers, self._explain)
        except Exception:  # the hints (reply-code catalogue) or the headers: the DSN goes without
            log.exception("%s: building the DSN failed; sending it without hints", entry.queue_id)
            try:
                body = dsn(headers, lambda reply: None)
            except Exception:
                body = dsn(b"", lambda reply: None)
        log.info("%s: bounce to <%s> for %d recipient(s)", entry.queue_id, sender, len(failures))
        self._metrics.bounces.inc()
        envelope = Envelope(mail_from="", rcpt_tos=(sender,), device="relay365", is_dsn=True)
        return Bounce(stuff(body), envelope)


_OUTCOME_EVENTS = {
    RcptState.DELIVERED: EventKind.DELIVERED,
    RcptState.DEFERRED: EventKind.DEFERRED,
    RcptState.BOUNCED: EventKind.BOUNCED,
    RcptState.QUEUED: EventKind.DEFERRED,
}
