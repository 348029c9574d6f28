"""One delivery attempt end to end through the scheduler, on the in-memory spool, transports that
answer what the test scripts, and a clock the test moves: fallback, back-off, bounce with one DSN,
hold-backs of an unreachable upstream, pacing postponements. No socket, no real time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from relay365.delivery.router import Router
from relay365.delivery.scheduler import Scheduler
from relay365.errors import UpstreamUnreachableError
from relay365.observability.tracking import EventKind, MemoryTrackingLog, TrackingEvent
from relay365.settings import DeliverySettings, RouteSettings
from relay365.spool.memory import MemorySpool, MemoryStore
from relay365.spool.model import Envelope, QueueEntry, RcptState
from relay365.transports.base import OutboundMessage, Outcome, PaceLimits, RecipientResult
from tests.support import Clock

SETTINGS = DeliverySettings(
    concurrency=4, min_backoff=60, max_backoff=600, queue_lifetime=3600, poll_interval=1
)
ENV = Envelope("scanner@contoso.com", ("alice@contoso.com", "bob@contoso.com"), device="printer")
OK = "250 2.0.0 OK"


@dataclass
class ScriptedTransport:
    """Answers each recipient with the next scripted reply for it (OK when none is left)."""

    name: str
    replies: dict[str, list[str]] = field(default_factory=dict)
    raises: list[Exception] = field(default_factory=list)
    sent: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    async def deliver(self, message: OutboundMessage) -> list[RecipientResult]:
        self.sent.append((message.mail_from, message.rcpt_tos))
        if self.raises:
            raise self.raises.pop(0)
        out = []
        for r in message.rcpt_tos:
            scripted = self.replies.get(r)
            reply = scripted.pop(0) if scripted else OK
            outcome = {"2": Outcome.DELIVERED, "4": Outcome.TRANSIENT}.get(reply[0], Outcome.PERMANENT)
            out.append(RecipientResult(r, outcome, reply))
        return out

    async def close(self) -> None:
        pass


@dataclass
class PacedScripted(ScriptedTransport):
    pacing_key: str = "scanner@contoso.com"
    pacing: PaceLimits = field(default_factory=lambda: PaceLimits(messages_per_window=1, window=60))


class Recorded(MemoryTrackingLog):
    """The tracking log, kept whole for the test to read."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[TrackingEvent] = []

    def record(self, event: TrackingEvent) -> None:
        self.events.append(event)


class Relay:
    def __init__(self, *transports: ScriptedTransport, routes: tuple[RouteSettings, ...]) -> None:
        self.clock = Clock()
        self.spool = MemorySpool(MemoryStore(), clock=self.clock)
        self.transports = {t.name: t for t in transports}
        self.tracking = Recorded()
        self.scheduler = Scheduler(
            spool=self.spool,
            router=Router(routes),
            transports=self.transports,
            settings=SETTINGS,
            hostname="relay.test",
            clock=self.clock,
            owner="test",
            tracking=self.tracking,
        )

    async def attempt(self) -> int:
        started = await self.scheduler.run_once()
        await self.scheduler.drain()
        return started

    def outcomes(self, qid: str) -> dict[str, EventKind]:
        """Each recipient's last outcome (delivered, deferred, bounced) from the tracking log."""
        kinds = (EventKind.DELIVERED, EventKind.DEFERRED, EventKind.BOUNCED)
        return {e.recipient: e.kind for e in self.tracking.events if e.queue_id == qid and e.kind in kinds}

    async def entry(self, qid: str) -> QueueEntry:
        found = await self.spool.get(qid)
        assert found is not None
        return found

    async def states(self, qid: str) -> dict[str, tuple[RcptState, int, float, str]]:
        e = await self.entry(qid)
        return {r.rcpt: (r.state, r.attempts, r.next_attempt, r.last_reply) for r in e.recipients}


@pytest.fixture
async def relay_factory() -> AsyncIterator[list[Relay]]:
    made: list[Relay] = []
    yield made
    for r in made:
        await r.scheduler.stop(grace=0.1)
        await r.spool.close()


async def make(made: list[Relay], *transports: ScriptedTransport, routes: tuple[RouteSettings, ...]) -> Relay:
    relay = Relay(*transports, routes=routes)
    await relay.spool.open()
    await relay.spool.recover("test")
    made.append(relay)
    return relay


async def test_route_level_refusal_falls_back_recipient_level_settles(relay_factory: list[Relay]) -> None:
    graph = ScriptedTransport(
        "graph",
        {"alice@contoso.com": ["550 5.7.60 SendAs denied"], "bob@contoso.com": ["550 5.1.1 User unknown"]},
    )
    smtp = ScriptedTransport("smtp")
    relay = await make(
        relay_factory, graph, smtp, routes=(RouteSettings(name="r", transport="graph", fallbacks=("smtp",)),)
    )
    qid = await relay.spool.enqueue(ENV, b"Subject: scan\r\n\r\nbody\r\n")
    assert await relay.attempt() == 1
    assert smtp.sent == [("scanner@contoso.com", ("alice@contoso.com",))]
    assert relay.outcomes(qid) == {
        "alice@contoso.com": EventKind.DELIVERED,
        "bob@contoso.com": EventKind.BOUNCED,
    }
    assert [e.transport for e in relay.tracking.events if e.kind is EventKind.DELIVERED] == ["smtp"]
    # one DSN to the sender, from <>, queued with the outcome
    [dsn] = [e for e in await relay.spool.list() if e.envelope.is_dsn]
    assert (dsn.envelope.mail_from, dsn.envelope.rcpt_tos) == ("", ("scanner@contoso.com",))


async def test_transient_failures_back_off_on_the_clock_then_expire_into_one_dsn(
    relay_factory: list[Relay],
) -> None:
    up = ScriptedTransport("up", {"alice@contoso.com": ["451 4.3.0 busy"] * 20})
    relay = await make(relay_factory, up, routes=(RouteSettings(name="r", transport="up"),))
    env = Envelope("scanner@contoso.com", ("alice@contoso.com",), device="printer")
    qid = await relay.spool.enqueue(env, b"Subject: x\r\n\r\nbody\r\n")
    waits = []
    for _ in range(5):
        assert await relay.attempt() == 1
        state, _attempts, when, reply = (await relay.states(qid))["alice@contoso.com"]
        assert (state, reply) == (RcptState.DEFERRED, "451 4.3.0 busy")
        waits.append(when - relay.clock.now)
        assert await relay.attempt() == 0  # not due before its time
        relay.clock.now = when
    assert waits == [60, 120, 240, 480, 600]
    relay.clock.now = (await relay.entry(qid)).received_at + 3600
    assert await relay.attempt() == 1
    assert relay.outcomes(qid) == {"alice@contoso.com": EventKind.BOUNCED}
    assert len([e for e in await relay.spool.list() if e.envelope.is_dsn]) == 1


async def test_an_unreachable_upstream_is_held_back_without_counting_attempts(
    relay_factory: list[Relay],
) -> None:
    up = ScriptedTransport("up", raises=[UpstreamUnreachableError("421 4.4.0 connection refused")])
    relay = await make(relay_factory, up, routes=(RouteSettings(name="r", transport="up"),))
    first = await relay.spool.enqueue(ENV, b"Subject: 1\r\n\r\n1\r\n")
    assert await relay.attempt() == 1
    assert {s[:2] for s in (await relay.states(first)).values()} == {(RcptState.DEFERRED, 1)}
    held = relay.scheduler.suspended()["up"]
    assert held == relay.clock.now + 30  # holds.py: min(min_backoff, 30 s)
    second = await relay.spool.enqueue(ENV, b"Subject: 2\r\n\r\n2\r\n")
    assert await relay.attempt() == 0  # every transport held: nothing is taken
    relay.clock.advance(30)
    assert await relay.attempt() == 1
    assert relay.outcomes(second) == dict.fromkeys(ENV.rcpt_tos, EventKind.DELIVERED)


async def test_pacing_postpones_without_an_attempt_until_the_window_moves(relay_factory: list[Relay]) -> None:
    paced = PacedScripted("graph")
    relay = await make(relay_factory, paced, routes=(RouteSettings(name="r", transport="graph"),))
    one = await relay.spool.enqueue(ENV, b"Subject: 1\r\n\r\n1\r\n")
    two = await relay.spool.enqueue(ENV, b"Subject: 2\r\n\r\n2\r\n")
    await relay.attempt()
    [sent] = [q for q in (one, two) if relay.outcomes(q) == dict.fromkeys(ENV.rcpt_tos, EventKind.DELIVERED)]
    [waiting] = [q for q in (one, two) if q != sent]
    assert len(paced.sent) == 1  # one message per 60 s window
    for state, attempts, when, reply in (await relay.states(waiting)).values():
        assert (state, attempts) == (RcptState.QUEUED, 0)  # not a failure: no attempt counted
        assert reply.startswith("paced: scanner@contoso.com is at its limit") and when > relay.clock.now
    relay.clock.advance(60)
    await relay.attempt()
    assert relay.outcomes(waiting) == dict.fromkeys(ENV.rcpt_tos, EventKind.DELIVERED)
