"""The scheduler on claims: two schedulers (two processes) on one spool, a scheduler that dies, one
that stops, one that loses its lease, and "queue retry" lifting held-back upstreams.

Fast unit tests: the in-memory spool (the contract suite proves it behaves like SQLite) and a
transport double (no upstream is involved in these decisions), on a clock the test moves.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator

import pytest

from relay365.delivery.claims import Claims
from relay365.delivery.router import Router
from relay365.delivery.scheduler import Scheduler
from relay365.errors import UpstreamUnreachableError
from relay365.settings import DeliverySettings, RouteSettings
from relay365.spool.memory import MemorySpool, MemoryStore
from relay365.spool.model import Envelope, RcptState
from relay365.transports.base import OutboundMessage, Outcome, RecipientResult
from tests.support import Clock, wait_until

ENV = Envelope("scanner@contoso.com", ("alice@contoso.com",), device="printer")
SETTINGS = DeliverySettings(concurrency=4, min_backoff=60, max_backoff=600, poll_interval=0.05, lease=60)


class CountingTransport:
    """Delivers every message, counting copies per queue id; ``gate`` holds deliveries while clear."""

    def __init__(self, name: str = "up") -> None:
        self.name = name
        self.copies: collections.Counter[str] = collections.Counter()
        self.bodies: dict[str, bytes] = {}
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self.fail_next: Exception | None = None

    async def deliver(self, message: OutboundMessage) -> list[RecipientResult]:
        body = await message.read_body()  # read first, as a transport sending it would
        self.started.set()
        await self.gate.wait()
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        self.bodies[message.queue_id] = body
        self.copies[message.queue_id] += 1
        return [RecipientResult(r, Outcome.DELIVERED, "250 2.0.0 Ok") for r in message.rcpt_tos]

    async def close(self) -> None:
        pass


class Node:
    """One relay process: its handle on the shared store, its scheduler, its transport."""

    def __init__(self, store: MemoryStore, clock: Clock, owner: str) -> None:
        self.spool = MemorySpool(store, clock=clock)
        self.transport = CountingTransport()
        self.owner = owner
        self.scheduler = Scheduler(
            spool=self.spool,
            router=Router((RouteSettings(name="default", transport="up"),)),
            transports={"up": self.transport},
            settings=SETTINGS,
            hostname="relay.test",
            clock=clock,
            owner=owner,
        )
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> Node:
        await self.spool.open()
        await self.spool.recover(self.owner)
        self.task = asyncio.create_task(self.scheduler.run())
        return self

    async def stop(self) -> None:
        await self.scheduler.stop(grace=0.2)
        await self.crash()

    async def crash(self) -> None:
        """The process dies: its tasks stop where they are, its owner lock goes (handle closed)."""
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.spool.close()


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[MemoryStore, Clock, list[Node]]]:
    store, clock, started = MemoryStore(), Clock(), []
    yield store, clock, started
    for node in started:
        if node.spool._open:
            await node.stop()


async def start(env: tuple[MemoryStore, Clock, list[Node]], owner: str, lease: float | None = None) -> Node:
    store, clock, started = env
    node = Node(store, clock, owner)
    if lease is not None:
        node.scheduler._claims.lease = lease
    await node.start()
    started.append(node)
    return node


async def queue(node: Node, n: int) -> list[str]:
    return [await node.spool.enqueue(ENV, f"Subject: {i}\r\n\r\nbody {i}\r\n".encode()) for i in range(n)]


async def empty(node: Node) -> bool:
    return await node.spool.list() == []


async def test_two_schedulers_on_one_spool_deliver_each_message_once(
    nodes: tuple[MemoryStore, Clock, list[Node]],
) -> None:
    a, b = await start(nodes, "node-a"), await start(nodes, "node-b")
    ids = await queue(a, 40)
    await wait_until(lambda: empty(a), what="the queue to drain")
    both = a.transport.copies + b.transport.copies
    assert sorted(both) == sorted(ids) and set(both.values()) == {1}
    assert a.transport.copies and b.transport.copies  # both delivered (each woke on the other's mail)
    assert all(body.endswith(b"\r\n") for body in a.transport.bodies.values())  # read via the spool


async def test_a_dead_schedulers_messages_go_at_once_after_recover(
    nodes: tuple[MemoryStore, Clock, list[Node]],
) -> None:
    store, _clock, _ = nodes
    a = await start(nodes, "node-a")
    a.transport.gate.clear()  # node-a hangs inside its deliveries
    [qid] = await queue(a, 1)
    await asyncio.wait_for(a.transport.started.wait(), 10)
    await a.crash()  # kill -9: its claim stays behind
    assert store.messages[qid].entry.claimed_by == "node-a"
    b = await start(nodes, "node-b")  # recover: node-a is provably dead, its claim released
    await wait_until(lambda: empty(b), what="node-b to deliver")
    assert b.transport.copies == {qid: 1} and a.transport.copies == {}


async def test_a_stalled_owners_claim_expires_then_its_late_outcome_is_dropped(
    nodes: tuple[MemoryStore, Clock, list[Node]], caplog: pytest.LogCaptureFixture
) -> None:
    _store, clock, _ = nodes
    a = await start(nodes, "node-a")
    a.transport.gate.clear()  # node-a stalls mid-delivery (alive: its claim is not released)
    [qid] = await queue(a, 1)
    await asyncio.wait_for(a.transport.started.wait(), 10)
    assert a.task is not None
    a.task.cancel()  # ... and its scheduler with it (a paused VM): no pass, no renewal
    await asyncio.gather(a.task, return_exceptions=True)
    b = await start(nodes, "node-b")
    await asyncio.sleep(0.2)  # several passes of node-b: the claim still runs
    assert b.transport.copies == {}
    clock.advance(SETTINGS.lease)  # node-a renews nothing (it is stuck): the lease runs out
    b.scheduler.wake()
    await wait_until(lambda: empty(b), what="node-b to take over")
    with caplog.at_level(logging.WARNING, logger="relay365.delivery"):
        a.transport.gate.set()  # node-a wakes up and sends its copy: the only duplicate allowed
        await wait_until(lambda: _true(a.transport.copies[qid] == 1), what="node-a's late copy")
        await a.scheduler.drain()
    assert "delivery outcome not recorded" in caplog.text and "no longer claimed by node-a" in caplog.text
    assert a.scheduler.delivery_stopped() is None  # a lost claim is not a spool fault
    assert b.transport.copies == {qid: 1} and await b.spool.list() == []


async def _true(value: bool) -> bool:
    return value


async def test_stop_gives_unfinished_claims_back(nodes: tuple[MemoryStore, Clock, list[Node]]) -> None:
    a = await start(nodes, "node-a")
    a.transport.gate.clear()
    ids = await queue(a, 3)
    await asyncio.wait_for(a.transport.started.wait(), 10)
    await a.stop()  # grace runs out: the deliveries are cancelled, their claims released
    b = await start(nodes, "node-b")
    await wait_until(lambda: empty(b), what="node-b to deliver")
    assert sorted(b.transport.copies) == sorted(ids)


async def test_running_deliveries_keep_their_claims_renewed() -> None:
    store, clock = MemoryStore(), Clock()
    spool, other = MemorySpool(store, clock=clock), MemorySpool(store, clock=clock)
    await spool.open()
    await spool.recover("node-a")
    await other.open()
    claims = Claims(spool=spool, owner="node-a", lease=0.3, clock=clock)  # renewed every 0.1 s
    q1, q2 = await queue_on(spool, 2)
    assert sorted(e.queue_id for e in await claims.take(now=clock.now, limit=1)) == [q1]
    renewer = asyncio.create_task(claims.keep_renewed())
    try:
        clock.advance(10)  # far past the lease: only renewals keep q1 node-a's
        await wait_until(
            lambda: _true(store.messages[q1].entry.claimed_until == clock.now + 0.3), what="renewal"
        )
        assert await other.claim(owner="node-b", now=clock.now, limit=10, lease=60) == [await spool.get(q2)]
        claims.done(q1)  # its outcome was recorded: no more renewals
        clock.advance(10)
        await asyncio.sleep(0.4)
        assert store.messages[q1].entry.claimed_until < clock.now
    finally:
        renewer.cancel()
        await asyncio.gather(renewer, return_exceptions=True)
        await spool.close()
        await other.close()


async def queue_on(spool: MemorySpool, n: int) -> list[str]:
    ids = []
    for i in range(n):
        await asyncio.sleep(0.002)  # queue ids sort by arrival to the millisecond
        ids.append(await spool.enqueue(ENV, f"Subject: {i}\r\n\r\nbody\r\n".encode()))
    return ids


async def test_queue_retry_from_anywhere_lifts_held_back_upstreams(
    nodes: tuple[MemoryStore, Clock, list[Node]],
) -> None:
    store, clock, _ = nodes
    a = await start(nodes, "node-a")
    a.transport.fail_next = UpstreamUnreachableError("451 4.4.1 up: connection refused")
    [qid] = await queue(a, 1)
    await wait_until(lambda: _true(bool(a.scheduler.suspended())), what="the upstream to be held back")
    [r] = (await a.spool.get(qid)).recipients
    assert r.state is RcptState.DEFERRED
    admin = MemorySpool(store, clock=clock)  # `relay365 queue retry` in another process
    await admin.open()
    await admin.retry(qid, clock.now)
    await admin.close()
    await wait_until(lambda: empty(a), what="the retry")
    assert a.scheduler.suspended() == {} and a.transport.copies == {qid: 1}
