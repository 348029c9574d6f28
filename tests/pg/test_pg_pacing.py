"""Pacing shared through PostgreSQL (delivery/pacestore_pg.py) on a controlled clock: two nodes are two
``PgPaceStore`` on two spool handles of one database. Microsoft's limits hold for the mailbox, so the
nodes together never exceed one window, one daily recipient count, one set of session slots; a dead
node's slot expires; a pause after a throttling reply stops everyone; reserving is atomic. Hold-backs of
dead upstreams are shared the same way. The single-process store (LocalPaceStore) passes the same
single-node checks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from relay365.delivery.holds_pg import PgHoldBoard
from relay365.delivery.pacestore import SESSION_LEASE, LocalPaceStore, PaceStore, Reservation
from relay365.delivery.pacestore_pg import PgPaceStore
from relay365.delivery.pacing import SESSION_WAIT
from relay365.spool.memory import MemorySpool
from relay365.spool.model import Envelope
from relay365.spool.postgres import PgSpool, PgTarget
from relay365.transports.base import PaceLimits
from tests.core.helpers import T0, Clock
from tests.pgcluster import PgDatabase

KEY = "mailbox:scanner@contoso.com"


@dataclass
class Nodes:
    clock: Clock
    make: Callable[[], PaceStore]
    spools: list[PgSpool]


@pytest.fixture
async def nodes(pg: PgDatabase) -> AsyncIterator[Nodes]:
    clock = Clock()
    spools: list[PgSpool] = []
    stores: list[PaceStore] = []

    def make() -> PaceStore:
        spool = PgSpool(PgTarget(url=pg.url, password=pg.password), clock=clock)
        spools.append(spool)
        store = PgPaceStore(spool, owner=f"node-{len(spools)}", clock=clock)
        stores.append(store)
        return store

    n = Nodes(clock, make, spools)
    try:
        yield n
    finally:
        for store in stores:
            await store.close()
        for spool in spools:
            await spool.close()


async def two(n: Nodes) -> tuple[PaceStore, PaceStore]:
    a, b = n.make(), n.make()
    for spool in n.spools:
        await spool.open()
    return a, b


async def send(store: PaceStore, limits: PaceLimits, recipients: int = 1) -> Reservation:
    got = await store.reserve(KEY, limits, recipients)
    assert isinstance(got, Reservation), f"had to wait {got}s"
    return got


async def sent(store: PaceStore, limits: PaceLimits, recipients: int = 1) -> None:
    await store.settle(await send(store, limits, recipients), delivered=recipients)


@pytest.mark.parametrize("kind", ["local", "postgres"])
async def test_one_node_keeps_the_window_the_day_and_the_sessions(kind: str, nodes: Nodes) -> None:
    store: PaceStore = LocalPaceStore(clock=nodes.clock) if kind == "local" else (await two(nodes))[0]
    limits = PaceLimits(messages_per_window=3, window=60, recipients_per_day=10, concurrency=2)
    for _ in range(3):
        await sent(store, limits)
        nodes.clock.advance(1)
    assert await store.reserve(KEY, limits, 1) == pytest.approx(60 - 3)  # the first leaves at T0+60
    nodes.clock.advance(59)  # T0+62: the three have left the window
    slots = [await send(store, limits), await send(store, limits)]
    assert await store.reserve(KEY, limits, 1) == SESSION_WAIT  # both sessions busy
    await store.settle(slots[0], delivered=0)  # failed: not counted
    await store.settle(slots[1], delivered=5)
    head = await store.headroom(KEY, limits)
    assert (head.recipients_left, head.sessions_in_use) == (10 - 3 - 5, 0)
    nodes.clock.advance(120)
    assert await store.reserve(KEY, limits, 3) == pytest.approx(86_400 - 182)  # until T0's leaves the day


async def test_two_nodes_share_one_window_and_one_day(nodes: Nodes) -> None:
    a, b = await two(nodes)
    limits = PaceLimits(messages_per_window=3, window=60, recipients_per_day=100)
    await sent(a, limits)
    nodes.clock.advance(10)
    await sent(b, limits)
    await sent(a, limits)
    # the window is full for both: the next goes when a's first message (T0) leaves it
    assert await b.reserve(KEY, limits, 1) == pytest.approx(50)
    assert await a.reserve(KEY, limits, 1) == pytest.approx(50)
    assert await a.reserve("mailbox:other@contoso.com", limits, 1) != 0  # (a Reservation: per mailbox)
    nodes.clock.advance(50)
    await sent(b, limits, recipients=96)
    nodes.clock.advance(3600)
    assert await a.reserve(KEY, limits, 2) == pytest.approx(86_400 - 3660)  # 100 recipients a day, for both
    assert (await b.headroom(KEY, limits)).recipients_left == 1


async def test_session_slots_are_shared_and_a_dead_nodes_slot_expires(nodes: Nodes) -> None:
    a, b = await two(nodes)
    limits = PaceLimits(messages_per_window=100, window=60, concurrency=3)
    held = [await send(a, limits), await send(a, limits), await send(b, limits)]
    assert await b.reserve(KEY, limits, 1) == SESSION_WAIT
    assert await a.reserve(KEY, limits, 1) == SESSION_WAIT
    await b.settle(held[2], delivered=1)
    held[2] = await send(a, limits)  # the freed slot, taken by the other node
    await a.close()  # node a dies with three sessions open (never settled)
    assert await b.reserve(KEY, limits, 1) == SESSION_WAIT
    nodes.clock.advance(SESSION_LEASE + 1)  # its slots expire: nothing leaks
    await sent(b, limits)


async def test_reserving_is_atomic_across_nodes(nodes: Nodes) -> None:
    a, b = await two(nodes)
    limits = PaceLimits(messages_per_window=5, window=60, concurrency=100)
    got = await asyncio.gather(*(s.reserve(KEY, limits, 1) for s in (a, b) * 8))
    assert sum(isinstance(g, Reservation) for g in got) == 5  # never more than the window, all at once


async def test_a_pause_after_throttling_stops_every_node(nodes: Nodes) -> None:
    a, b = await two(nodes)
    limits = PaceLimits()
    await a.pause(KEY, 300)
    assert await b.reserve(KEY, limits, 1) == pytest.approx(300)
    nodes.clock.advance(300)
    await sent(b, limits)


async def test_the_windows_survive_a_restart_of_every_node(pg: PgDatabase) -> None:
    clock = Clock()
    limits = PaceLimits(messages_per_window=2, window=60)
    for round_ in range(2):
        spool = PgSpool(PgTarget(url=pg.url, password=pg.password), clock=clock)
        await spool.open()
        store = PgPaceStore(spool, owner=f"node-{round_}", clock=clock)
        try:
            if round_ == 0:
                await sent(store, limits)
                await sent(store, limits)
            else:
                assert await store.reserve(KEY, limits, 1) == pytest.approx(60)
                assert (await spool.pace_events(T0 - 1))[0].key == KEY  # the spool's pacing history
        finally:
            await store.close()
            await spool.close()


async def test_local_windows_survive_a_restart_through_the_spool() -> None:
    clock = Clock()
    spool = MemorySpool(clock=clock)
    await spool.open()
    await spool.recover("o")
    store = LocalPaceStore(clock=clock)
    limits = PaceLimits(messages_per_window=1, window=60)
    event = await store.settle(await send(store, limits), delivered=1)
    assert event is not None  # recorded with the outcome, in the spool
    qid = await spool.enqueue(Envelope("a@contoso.com", ("b@contoso.com",)), b"x")
    [entry] = await spool.claim(owner="o", now=T0, limit=1, lease=60)
    await spool.record(entry.queue_id, [], owner="o", pace_events=[event])
    restarted = LocalPaceStore(clock=clock)
    await restarted.restore(spool)
    assert await restarted.reserve(KEY, limits, 1) == pytest.approx(60)
    assert qid


async def test_hold_backs_are_shared_and_a_flush_lifts_them_everywhere(pg: PgDatabase) -> None:
    a = PgSpool(PgTarget(url=pg.url, password=pg.password))
    b = PgSpool(PgTarget(url=pg.url, password=pg.password))
    await a.open()
    await b.open()
    try:
        await PgHoldBoard(a).publish({"submission": (T0 + 30, "unreachable (451 4.4.1 refused)")})
        await PgHoldBoard(a).publish({"submission": (T0 + 10, "shorter")})  # never shortened
        assert await PgHoldBoard(b).current() == {"submission": T0 + 30}
        generation = b.flush_generation()
        await b.request_flush()  # `relay365 queue retry`
        assert await PgHoldBoard(a).current() == {}
        assert await a.wait_changed(5) and a.flush_generation() == generation + 1
    finally:
        await a.close()
        await b.close()
