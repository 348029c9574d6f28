"""The scheduler (Postfix's qmgr): picks due recipients, groups them per route, hands each group to
its transport, and records the outcome per recipient: delivered, deferred with back-off, or bounced
with exactly one DSN per failed attempt. It catches only the ``DeliveryError`` family from
transports; anything else is a bug, logged, and the entry is retried after a cool-down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from relay365.admin.metrics import Metrics
from relay365.delivery import backoff
from relay365.delivery.dsn import Failure, build_dsn, original_headers, status_of
from relay365.delivery.pacing import Headroom, Pacer, is_throttle_reply
from relay365.delivery.router import NoRoute, Router
from relay365.errors import PermanentDeliveryError, TransientDeliveryError
from relay365.observability.tracking import EventKind, MemoryTrackingLog, TrackingEvent, TrackingLog
from relay365.settings import DeliverySettings
from relay365.spool.model import (
    Bounce,
    Envelope,
    PaceEvent,
    QueueEntry,
    RcptState,
    RecipientUpdate,
    Spool,
)
from relay365.transports.base import (
    OutboundMessage,
    Outcome,
    PacedTransport,
    RecipientResult,
    Transport,
)

log = logging.getLogger(__name__)
SUSPEND_SECONDS = 30.0  # how long an unreachable upstream is left alone (at most min_backoff)
UNREACHABLE = "451 4.4.1"  # the transports' reply for "could not connect / TLS failed"
NO_ROUTE_REPLY = "554 5.4.4 No route configured for this recipient"


def route_level(reply: str) -> bool:
    """A failure of the way (auth, permission, attribution, connection, throttling) rather than of
    the recipient (RFC 3463 x.1.x addressing, Exchange's 5.4.1 "recipient address rejected"): only
    those move on to a route's fallback transport."""
    status = status_of(reply)
    return not (status[2:].startswith("1.") or status.endswith(".4.1"))


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
    ) -> None:
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
        self._inflight: set[str] = set()
        self._cooldown: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._pacer = Pacer(clock=clock)
        self._suspended: dict[str, float] = {}
        self._flush_seen = spool.flush_requested()

    def wake(self, queue_id: str = "") -> None:
        self._wake.set()

    async def load_pacing(self) -> None:
        """Restore the pacing windows from the spool (they survive a restart)."""
        self._pacer.load(await self._spool.pace_events(self._clock() - 86_400.0))

    async def run(self) -> None:
        while not self._stopping:
            try:
                await self.run_once()
                timeout = await self._sleep_time()
            except Exception:
                log.exception("scheduler pass failed; retrying after the poll interval")
                timeout = self._settings.poll_interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()

    async def _sleep_time(self) -> float:
        poll = self._settings.poll_interval
        if len(self._inflight) >= self._settings.concurrency:
            return poll
        nxt = await self._spool.next_due_time()
        back = self._all_suspended(self._clock())
        if back is not None:
            nxt = back if nxt is None else max(nxt, back)
        if nxt is None:
            return poll
        return max(0.05, min(poll, nxt - self._clock()))

    def _excluded(self, now: float) -> frozenset[str]:
        for qid, until in list(self._cooldown.items()):
            if until <= now:
                del self._cooldown[qid]
        return frozenset(self._inflight | self._cooldown.keys())

    def _suspend(self, name: str, reply: str) -> None:
        """An upstream that cannot be reached is not tried for every message (Postfix: a dead
        destination); its mail waits in the queue until the suspension ends."""
        now = self._clock()
        until = now + min(self._settings.min_backoff, SUSPEND_SECONDS)
        held = self._suspended.get(name, 0.0)
        if held <= now:  # one warning per hold, not one per delivery that was already under way
            log.warning("transport %s unreachable (%s); holding its mail for %.0fs", name, reply, until - now)
        self._suspended[name] = max(held, until)

    def headroom(self, transport: PacedTransport) -> Headroom:
        """Pacing headroom of a paced transport's mailbox (read-only, for the console)."""
        return self._pacer.headroom(transport.pacing_key, transport.pacing)

    def suspended(self) -> dict[str, float]:
        """Transports held back as unreachable, with the time their hold ends."""
        now = self._clock()
        return {name: until for name, until in self._suspended.items() if until > now}

    def _all_suspended(self, now: float) -> float | None:
        """When every transport is suspended: the time the first one comes back."""
        ends = [self._suspended.get(name, 0.0) for name in self._transports]
        return min(ends) if ends and min(ends) > now else None

    async def run_once(self) -> int:
        """Start delivery of every due entry that fits the concurrency; return how many started."""
        free = self._settings.concurrency - len(self._inflight)
        if free <= 0 or self._stopping:
            return 0
        now = self._clock()
        flush = self._spool.flush_requested()
        if flush > self._flush_seen:
            # "queue retry" means now: forget which upstreams were held back (Postfix: flush dead).
            self._flush_seen = flush
            self._suspended.clear()
            self._cooldown.clear()
        if self._all_suspended(now) is not None:
            return 0
        entries = await self._spool.due(now, limit=free, exclude=self._excluded(now))
        for entry in entries:
            self._inflight.add(entry.queue_id)
            task = asyncio.create_task(self._deliver(entry), name=f"deliver-{entry.queue_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(entries)

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

    async def _deliver(self, entry: QueueEntry) -> None:
        ok = False
        try:
            await self._attempt(entry)
            ok = True
        except Exception:
            log.exception("delivery of %s failed unexpectedly; retrying after cool-down", entry.queue_id)
        finally:
            self._inflight.discard(entry.queue_id)
            if not ok:
                self._cooldown[entry.queue_id] = self._clock() + self._settings.min_backoff
            self._wake.set()

    def _groups(
        self, entry: QueueEntry, now: float
    ) -> tuple[dict[tuple[str, tuple[str, ...]], list[str]], list[tuple[str, str]]]:
        groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
        unroutable: list[tuple[str, str]] = []
        for r in entry.recipients:
            if r.state not in (RcptState.QUEUED, RcptState.DEFERRED) or r.next_attempt > now:
                continue
            try:
                choice = self._router.choose(
                    rcpt=r.rcpt,
                    sender=entry.envelope.mail_from,
                    device=entry.envelope.device,
                    size=entry.size,
                )
            except NoRoute as e:
                log.warning("%s: %s", entry.queue_id, e)
                unroutable.append((r.rcpt, str(e)))
                continue
            groups.setdefault((choice.transport, choice.fallbacks), []).append(r.rcpt)
            self._track(
                entry, EventKind.ROUTED, r.rcpt, choice.transport, detail=f"{choice.route}: {choice.reason}"
            )
        return groups, unroutable

    async def _send(self, transport: Transport, entry: QueueEntry, rcpts: list[str]) -> list[RecipientResult]:
        message = OutboundMessage(
            queue_id=entry.queue_id,
            mail_from=entry.envelope.mail_from,
            rcpt_tos=tuple(rcpts),
            body_path=entry.body_path,
            size=entry.size,
            smtputf8=entry.envelope.smtputf8,
        )
        try:
            results = await transport.deliver(message)
        except TransientDeliveryError as e:
            if e.reply.startswith(UNREACHABLE):
                self._suspend(transport.name, e.reply)
            return [RecipientResult(r, Outcome.TRANSIENT, e.reply, e.retry_after) for r in rcpts]
        except PermanentDeliveryError as e:
            return [RecipientResult(r, Outcome.PERMANENT, e.reply) for r in rcpts]
        missing = set(rcpts) - {r.rcpt for r in results}
        results += [
            RecipientResult(r, Outcome.TRANSIENT, "451 4.3.0 no result from transport")
            for r in sorted(missing)
        ]
        return results

    async def _attempt(self, entry: QueueEntry) -> None:
        now = self._clock()
        groups, unroutable = self._groups(entry, now)
        states = {r.rcpt: r for r in entry.recipients}
        updates: list[RecipientUpdate] = []
        failures = [Failure(r, f"{NO_ROUTE_REPLY} ({why})") for r, why in unroutable]
        updates += [RecipientUpdate(f.rcpt, RcptState.BOUNCED, f.reply) for f in failures]
        events: list[PaceEvent] = []
        pending = [(name, fallbacks, rcpts) for (name, fallbacks), rcpts in groups.items()]
        while pending:
            name, fallbacks, rcpts = pending.pop(0)
            transport = self._transports[name]
            paced = transport if isinstance(transport, PacedTransport) else None
            if self._suspended.get(name, 0.0) > now:
                updates += [
                    RecipientUpdate(
                        r, states[r].state, states[r].last_reply, self._suspended[name], counts_attempt=False
                    )
                    for r in rcpts
                ]
                continue
            if paced is not None:
                wait = self._pacer.wait_time(paced.pacing_key, paced.pacing, len(rcpts))
                if wait > 0:
                    # Not a failure: the recipients stay as they are and become due when allowed.
                    reply = f"paced: {paced.pacing_key} is at its limit, next try in {wait:.1f}s"
                    updates += [
                        RecipientUpdate(
                            r,
                            states[r].state,
                            states[r].last_reply or reply,
                            now + wait,
                            counts_attempt=False,
                        )
                        for r in rcpts
                    ]
                    continue
            slot = self._pacer.begin(paced.pacing_key, len(rcpts)) if paced is not None else None
            for r in rcpts:
                self._track(entry, EventKind.ATTEMPTED, r, name)
            results: list[RecipientResult] = []
            try:
                results = await self._send(transport, entry, rcpts)
            finally:
                if slot is not None:
                    delivered = sum(1 for r in results if r.outcome is Outcome.DELIVERED)
                    if (event := self._pacer.end(slot, delivered=delivered)) is not None:
                        events.append(event)
            if paced is not None:
                self._slow_down(paced, results)
            retry: list[str] = []
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
                if res.outcome is not Outcome.DELIVERED and fallbacks and route_level(res.reply):
                    retry.append(res.rcpt)
                else:
                    update = self._update(entry, res, states[res.rcpt].attempts, failures)
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
        bounce = await self._bounce(entry, failures)
        await self._spool.record(entry.queue_id, updates, bounce=bounce, pace_events=events)
        for u in updates:
            if u.counts_attempt:
                self._track(entry, _OUTCOME_EVENTS[u.state], u.rcpt, u.transport, reply=u.reply)

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

    def _slow_down(self, paced: PacedTransport, results: list[RecipientResult]) -> None:
        """A throttling reply pauses the mailbox (Retry-After, or one window)."""
        for res in results:
            if is_throttle_reply(res.reply):
                pause = res.retry_after or paced.pacing.window
                log.warning(
                    "%s: upstream throttles (%s); pausing it %.0fs", paced.pacing_key, res.reply, pause
                )
                self._pacer.pause(paced.pacing_key, pause)
                return

    def _update(
        self, entry: QueueEntry, res: RecipientResult, attempts: int, failures: list[Failure]
    ) -> RecipientUpdate:
        if res.outcome is Outcome.DELIVERED:
            return RecipientUpdate(res.rcpt, RcptState.DELIVERED, res.reply)
        if res.outcome is Outcome.PERMANENT:
            failures.append(Failure(res.rcpt, res.reply))
            return RecipientUpdate(res.rcpt, RcptState.BOUNCED, res.reply)
        if backoff.expired(entry.received_at, self._clock(), lifetime=self._settings.queue_lifetime):
            failures.append(Failure(res.rcpt, res.reply, expired=True))
            return RecipientUpdate(res.rcpt, RcptState.BOUNCED, res.reply)
        when = backoff.next_attempt(
            self._clock(),
            attempts + 1,
            minimum=self._settings.min_backoff,
            maximum=self._settings.max_backoff,
            retry_after=res.retry_after,
        )
        return RecipientUpdate(res.rcpt, RcptState.DEFERRED, res.reply, when)

    async def _bounce(self, entry: QueueEntry, failures: list[Failure]) -> Bounce | None:
        if not failures:
            return None
        sender = entry.envelope.mail_from
        if not sender or entry.envelope.is_dsn:
            log.warning(
                "%s: not bouncing a message from <> (%d failed recipient(s))", entry.queue_id, len(failures)
            )
            return None
        head = await asyncio.to_thread(_read_head, entry)
        body = build_dsn(
            hostname=self._hostname,
            queue_id=entry.queue_id,
            original_sender=sender,
            arrival=entry.received_at,
            failures=failures,
            headers=original_headers(head),
            explain=self._explain,
        )
        log.info("%s: bounce to <%s> for %d recipient(s)", entry.queue_id, sender, len(failures))
        self._metrics.bounces.inc()
        return Bounce(body, Envelope(mail_from="", rcpt_tos=(sender,), device="relay365", is_dsn=True))


_OUTCOME_EVENTS = {
    RcptState.DELIVERED: EventKind.DELIVERED,
    RcptState.DEFERRED: EventKind.DEFERRED,
    RcptState.BOUNCED: EventKind.BOUNCED,
    RcptState.QUEUED: EventKind.DEFERRED,
}


def _read_head(entry: QueueEntry) -> bytes:
    with entry.body_path.open("rb") as f:
        return f.read(64 * 1024)
