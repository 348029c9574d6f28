"""The trace follower: after Microsoft 365 said 250 (or 202), ask its message trace what became of the
message, recipient by recipient, until the status is final or ``[tracing] horizon`` passes, and write
Microsoft's status and events into the tracking log (``m365_status``, ``m365_event``, ``m365_unresolved``).

Theory of operation, one pass (:meth:`TraceFollower.run_once`):

1. intake (:mod:`.intake`): new ``delivered`` events of followed transports become rows in the
   follow store (:mod:`.work`), due ``poll_interval`` after the handoff;
2. lead, then claim the due rows: of the relays sharing the store one at a time asks Microsoft (the
   quota is the tenant's), and rows are claimed with owner + lease, so none is asked about or
   recorded twice and the rows of a relay that died are taken over once its lease runs out;
3. per app registration (one per tenant, :mod:`.apps`), ask the trace (:mod:`.lookup`) within the
   tenant's quota: the client's token bucket keeps every request inside 80 of Microsoft's 100 per
   5 minutes, and a pass reads the events of at most ``details`` recipients, so it stays short;
4. decide each row (:mod:`.decide`), write the rows back (only those still held), then record their
   events and count the final statuses (``relay365_m365_outcomes``).

A 403 (no ``ExchangeMessageTrace.Read.All``) is logged once per app; that app's rows wait and the app
is asked again every :data:`PERMISSION_RECHECK` seconds (an admin may grant the permission), so the
mail of the last ``horizon`` is followed once it is granted. Nothing else in the relay waits for the
follower or fails with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from relay365.errors import Relay365Error, TracePermissionError
from relay365.oauth import GRAPH_SCOPE, TokenSource, token_source
from relay365.observability.metrics import Metrics
from relay365.observability.tracking import TrackingLog
from relay365.settings import Settings
from relay365.tracing.apps import FollowPlan, TraceApp, follow_plan
from relay365.tracing.budget import TokenBucket
from relay365.tracing.decide import UNRESOLVED, Found, Settled, later, settle
from relay365.tracing.graph_trace import MessageTraceClient
from relay365.tracing.intake import take_in
from relay365.tracing.lookup import DetailBudget, ask
from relay365.tracing.work import FollowItem, FollowStore, MemoryFollowStore
from relay365.tracing.work_sqlite import SqliteFollowStore

log = logging.getLogger(__name__)
LEASE = 1800.0  # a claim outlasts any pass (a 429 makes the client wait up to 15 minutes)
BATCH = 5000  # rows claimed per pass
DETAILS_PER_PASS = 20  # getDetailsByRecipient requests per pass: the bucket's burst
PERMISSION_RECHECK = 3600.0
MIN_PAUSE = 5.0  # between passes when rows are due at once (the token bucket paces the requests)
PURGE_EVERY = 3600.0


@dataclass(frozen=True, slots=True)
class PassReport:
    taken_in: int = 0
    asked: int = 0
    settled: int = 0
    led: bool = True  # False: another relay asks Microsoft for now


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class TraceFollower:
    def __init__(
        self,
        *,
        settings: Settings,
        tracking: TrackingLog,
        store: FollowStore,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        owner: str | None = None,
        details_per_pass: int = DETAILS_PER_PASS,
        batch: int = BATCH,
    ) -> None:
        """``clock``: wall time (the trace's times, the rows' due times); ``monotonic`` and ``sleep``:
        the request budget and the client's pauses (tests run both on the sandbox clock)."""
        self.settings = settings
        self.plan: FollowPlan = follow_plan(settings)
        self.tracking = tracking
        self.store = store
        self.metrics = metrics or Metrics()
        self.owner = owner or _owner()
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._details = details_per_pass
        self._batch = batch
        self._clients: dict[str, tuple[MessageTraceClient, TokenSource]] = {}
        self._denied: dict[str, float] = {}  # app -> when to ask again
        self._told: set[str] = set()  # apps whose refusal was logged
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._purged = 0.0

    @property
    def requests(self) -> int:
        """Requests sent to Microsoft's trace by this follower's clients (logs, tests)."""
        return sum(client.requests for client, _ in self._clients.values())

    @property
    def throttled(self) -> int:
        """429 answers received."""
        return sum(client.throttled for client, _ in self._clients.values())

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.open()
        for name, why in self.plan.skipped.items():
            log.info("message trace: transport %s is not followed: %s", name, why)
        self._task = asyncio.create_task(self.run(), name="trace-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        async with self._lock:
            for client, tokens in self._clients.values():
                await client.aclose()
                tokens.close()
            self._clients.clear()
            try:  # stopped mid-pass: its rows and the lead go to the next relay now, not in 30 minutes
                await self.store.release(owner=self.owner)
            except Exception as e:  # a closing observer: the lease frees them later
                log.warning("message trace: could not release this relay's claims: %s", e)
            await self.store.close()

    async def run(self) -> None:
        poll = self.settings.tracing.poll_interval
        while True:
            try:
                report = await self.run_once()
                nxt = await self.store.next_due() if report.led else None
                pause = poll if nxt is None else min(poll, max(MIN_PAUSE, nxt - self._clock()))
            except Exception:  # the follower is an observer: log and go on
                log.exception("message trace follower pass failed; trying again in %.0f s", poll)
                pause = poll
            await asyncio.sleep(pause)

    # -- one pass ----------------------------------------------------------------------------------

    async def run_once(self) -> PassReport:
        async with self._lock:
            t = self.settings.tracing
            now = self._clock()
            new = await take_in(
                self.tracking, self.store, followed=self.plan.transports, now=now,
                horizon=t.horizon, first_check=t.poll_interval,
            )  # fmt: skip
            if not await self.store.lead(owner=self.owner, now=now, lease=LEASE):
                return PassReport(new, led=False)  # another relay asks Microsoft for now
            claimed = await self.store.claim(owner=self.owner, now=now, lease=LEASE, limit=self._batch)
            settled: list[Settled] = []
            by_app: dict[str, list[FollowItem]] = {}
            for item in claimed:
                app = self.plan.app_for(item.transport)
                if app is None:  # no longer followed (the configuration changed)
                    settled.append(Settled(item.but(done=True, status=UNRESOLVED)))
                else:
                    by_app.setdefault(app.name, []).append(item)
            for name, items in by_app.items():
                settled += await self._ask(self.plan.apps[name], items)
            written = await self.store.settle([s.item for s in settled], owner=self.owner)
            self._record(settled, {i.key for i in written})
            if now - self._purged >= PURGE_EVERY:
                self._purged = now
                await self.store.purge(now - self.settings.tracking.retention_days * 86400)
            return PassReport(new, len(claimed), len(written))

    async def _ask(self, app: TraceApp, items: Sequence[FollowItem]) -> list[Settled]:
        t = self.settings.tracing
        now = self._clock()
        wait_until = self._denied.get(app.name, 0.0)

        def wait(due: float, why: str, *, quiet: bool = False) -> list[Settled]:
            return [later(i, due=due, now=now, horizon=t.horizon, why=why, quiet=quiet) for i in items]

        if wait_until > now:
            return wait(wait_until, "no permission", quiet=True)
        try:
            client = self._client(app)
            found = await ask(
                client, items, now=now, budget=DetailBudget(self._details), sender_of=self._sender_of,
                keeps_id=self._keeps_id,
            )  # fmt: skip
        except TracePermissionError as e:
            self._refused(app, e)
            return wait(now + PERMISSION_RECHECK, "no permission", quiet=True)
        except Relay365Error as e:  # TraceError (no answer now), or the app's token cannot be had
            log.warning("message trace (app %s) did not answer: %s; asking again later", app.name, e)
            return wait(now + t.poll_interval, f"Microsoft's message trace could not be read ({e})")
        except Exception as e:  # a bug: these rows wait a poll interval, the others go on
            log.exception("message trace (app %s): the pass failed", app.name)
            return wait(now + t.poll_interval, f"the follower failed ({type(e).__name__})")
        self._allowed(app)
        now = self._clock()
        out = []
        for item in items:
            answer: Found | None = found.get(item.key)
            if answer is None:  # events due, but this pass's budget is spent: the next pass
                out.append(Settled(item.but(due=now)))
            else:
                out.append(settle(item, answer, now=now, poll=t.poll_interval, horizon=t.horizon))
        return out

    def _sender_of(self, item: FollowItem) -> str | None:
        """The sender to narrow a query with: the envelope sender for SMTP transports (Microsoft's
        senderAddress); Graph records the From: address, which relay365 does not parse."""
        try:
            kind = self.settings.transport(item.transport).type
        except KeyError:
            return None
        return item.sender.lower() if item.sender and kind != "graph" else None

    def _keeps_id(self, item: FollowItem) -> bool:
        """Graph's JSON sendMail (``save_to_sent_items = false``) builds a new message with a new
        Message-ID; every other transport hands Microsoft the message's own."""
        try:
            t = self.settings.transport(item.transport)
        except KeyError:
            return True
        return not (t.type == "graph" and not t.m365.save_to_sent_items)

    def _client(self, app: TraceApp) -> MessageTraceClient:
        known = self._clients.get(app.name)
        if known is not None:
            return known[0]
        tokens = token_source(app.settings, scope=GRAPH_SCOPE)
        budget = TokenBucket.for_quota(clock=self._monotonic, sleep=self._sleep)
        client = MessageTraceClient.for_transport(
            app.settings, tokens=tokens, budget=budget, wallclock=self._clock, sleep=self._sleep
        )
        self._clients[app.name] = (client, tokens)
        return client

    def _refused(self, app: TraceApp, error: TracePermissionError) -> None:
        self._denied[app.name] = self._clock() + PERMISSION_RECHECK
        self.metrics.m365_trace_allowed.labels(app.name).set(0)
        if app.name not in self._told:
            self._told.add(app.name)
            followed = sorted(t for t, a in self.plan.transports.items() if a == app.name)
            log.warning(
                "message trace: the app registration of transport %s (%s) may not read Microsoft 365's "
                "message trace, so relay365 does not follow mail of %s into the mailboxes; mail is "
                "delivered as before. %s ([tracing] enabled = false turns this off.)",
                app.name, app.settings.m365.client_id, ", ".join(followed), error,
            )  # fmt: skip

    def _allowed(self, app: TraceApp) -> None:
        self.metrics.m365_trace_allowed.labels(app.name).set(1)
        self._denied.pop(app.name, None)
        if app.name in self._told:
            self._told.discard(app.name)
            log.warning("message trace: the app of transport %s may read the trace now", app.name)

    def _record(self, settled: Sequence[Settled], written: set[tuple[str, str]]) -> None:
        for s in settled:
            if s.item.key not in written:
                continue  # another relay holds the row now: it records
            for event in s.events:
                self.tracking.record(event)
            if s.outcome is not None:
                self.metrics.m365_outcomes.labels(s.outcome, s.item.route, s.item.transport).inc()
            if s.unresolved:
                self.metrics.m365_unresolved.labels(s.item.route, s.item.transport).inc()


def follow_store(settings: Settings) -> FollowStore:
    """The store beside the tracking log: its SQLite file (the tracking log in memory: in memory)."""
    t = settings.tracking
    if not t.enabled:
        return MemoryFollowStore()
    return SqliteFollowStore(t.path or settings.server.spool_dir / "tracking.db")


async def start_follower(
    settings: Settings,
    *,
    tracking: TrackingLog,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.time,
    store: FollowStore | None = None,
) -> TraceFollower | None:
    """The composition root's one call: a running follower, or None (switched off, nothing to follow,
    or no tracking log to write into; the log says why)."""
    if not settings.tracing.enabled:
        return None
    if not settings.tracking.enabled:
        log.info("message trace: not followed, because [tracking] is off (Microsoft's events go there)")
        return None
    plan = follow_plan(settings)
    if not plan.transports:
        for name, why in plan.skipped.items():
            log.info("message trace: transport %s is not followed: %s", name, why)
        return None
    follower = TraceFollower(
        settings=settings, tracking=tracking, store=store or follow_store(settings), metrics=metrics,
        clock=clock,
    )  # fmt: skip
    await follower.start()
    log.info(
        "message trace: following %s (app %s) into Microsoft 365",
        ", ".join(sorted(plan.transports)), ", ".join(sorted(plan.apps)),
    )  # fmt: skip
    return follower
