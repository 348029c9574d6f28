"""The follow store contract (relay365.tracing.work), run against every backend: idempotent intake,
claims with owner and lease, settle only while holding the claim, what survives a reopen.

Two ``SqliteFollowStore`` objects on one file are two processes to SQLite (two connections), two
``PgFollowStore`` objects on one database two relay nodes on one PostgreSQL spool (two pools, a fresh
database per test from tests/support/pgcluster.py): the claims are tested across them, as relays sharing a
spool would use them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from relay365.spool.pg_connect import PgTarget
from relay365.tracing.work import FollowItem, FollowStore, MemoryFollowStore
from relay365.tracing.work_pg import PgFollowStore
from relay365.tracing.work_sqlite import SqliteFollowStore
from tests.support import PgDatabase

T0 = 1_800_000_000.0
Pair = tuple[FollowStore, FollowStore]


def item(n: int, *, sent: float = T0, route: str = "scans", **changes: object) -> FollowItem:
    base = FollowItem(
        queue_id=f"Q{n}", recipient="alice@contoso.test", message_id=f"m{n}@x", sender="s@contoso.test",
        subject=f"Scan {n}", device="mfp", transport="direct", route=route, sent_at=sent, due=sent + 60,
    )  # fmt: skip
    return base.but(**changes)


class Place:
    """Where a backend keeps its rows: a directory (SQLite's file), a database (PostgreSQL's)."""

    def __init__(self, tmp_path: Path, pg: PgDatabase | None) -> None:
        self.tmp_path = tmp_path
        self.pg = pg

    def store(self, backend: str) -> FollowStore:
        """A new store object on the same rows (another process / node); not opened."""
        if backend == "sqlite":
            return SqliteFollowStore(self.tmp_path / "tracking.db")
        assert backend == "postgres" and self.pg is not None
        return PgFollowStore(PgTarget(url=self.pg.url, password=self.pg.password))


async def _memory(place: Place) -> Pair:
    store = MemoryFollowStore()
    return store, store  # one object: "two processes" share it


async def _sqlite(place: Place) -> Pair:
    return await _two(place, "sqlite")


async def _postgres(place: Place) -> Pair:
    return await _two(place, "postgres")


async def _two(place: Place, backend: str) -> Pair:
    a, b = place.store(backend), place.store(backend)
    await a.open()
    await b.open()
    return a, b


FACTORIES: dict[str, Callable[[Place], Awaitable[Pair]]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "postgres": _postgres,
}
LASTING = ["postgres", "sqlite"]  # the backends whose rows outlive the store object


@pytest.fixture(params=LASTING)
def lasting(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Place]:
    """A backend whose rows outlive the store object, and where it keeps them."""
    pg = request.getfixturevalue("pg") if request.param == "postgres" else None
    return request.param, Place(tmp_path, pg)


@pytest.fixture(params=sorted(FACTORIES))
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Pair]:
    pg = request.getfixturevalue("pg") if request.param == "postgres" else None
    a, b = await FACTORIES[request.param](Place(tmp_path, pg))
    yield a, b
    await a.close()
    if b is not a:
        await b.close()


async def test_the_same_delivery_taken_in_twice_makes_one_row(stores: Pair) -> None:
    a, b = stores
    assert await a.add([item(1), item(2)]) == 2
    assert await b.add([item(1).but(subject="changed"), item(3)]) == 1
    assert [i.subject for i in await a.for_message("Q1")] == ["Scan 1"]


async def test_due_rows_go_to_one_owner_until_the_lease_ends(stores: Pair) -> None:
    a, b = stores
    await a.add([item(n) for n in range(5)] + [item(9, sent=T0 + 3600)])
    assert await a.claim(owner="A", now=T0 + 30, lease=600, limit=10) == []  # not due yet
    first = await a.claim(owner="A", now=T0 + 60, lease=600, limit=3)
    second = await b.claim(owner="B", now=T0 + 61, lease=600, limit=10)
    assert [i.queue_id for i in first] == ["Q0", "Q1", "Q2"]
    assert [i.queue_id for i in second] == ["Q3", "Q4"]  # never a row A holds, never one not due
    again = await b.claim(owner="B", now=T0 + 600, lease=600, limit=10)  # its own rows: renewed
    assert [i.queue_id for i in again] == ["Q3", "Q4"]
    taken_over = await b.claim(owner="B", now=T0 + 661, lease=600, limit=10)  # A's lease ran out
    assert [i.queue_id for i in taken_over] == ["Q0", "Q1", "Q2", "Q3", "Q4"]
    assert await a.claim(owner="A", now=T0 + 662, lease=600, limit=10) == []


async def test_settle_writes_only_rows_the_owner_still_holds(stores: Pair) -> None:
    a, b = stores
    await a.add([item(1), item(2)])
    held = await a.claim(owner="A", now=T0 + 60, lease=10, limit=10)
    await b.claim(owner="B", now=T0 + 100, lease=600, limit=10)  # A was too slow: B holds both now
    lost = await a.settle([i.but(status="delivered", done=True) for i in held], owner="A")
    assert lost == []
    mine = await b.claim(owner="B", now=T0 + 101, lease=600, limit=10)  # B's own claim, renewed
    done = await b.settle([mine[0].but(status="delivered", done=True, checks=1)], owner="B")
    assert [i.queue_id for i in done] == ["Q1"]
    later = await b.settle([mine[1].but(due=T0 + 500, checks=1)], owner="B")
    assert [i.due for i in later] == [T0 + 500]
    assert await a.next_due() == T0 + 500  # the done row is not due any more
    assert await a.claim(owner="A", now=T0 + 499, lease=600, limit=10) == []  # released, not yet due
    [again] = await a.claim(owner="A", now=T0 + 500, lease=600, limit=10)
    assert again.queue_id == "Q2" and again.checks == 1


async def test_outcomes_count_per_route_transport_and_status(stores: Pair) -> None:
    a, _ = stores
    await a.add([item(1), item(2), item(3, route="invoices"), item(4, sent=T0 - 90000)])
    rows = await a.claim(owner="A", now=T0 + 60, lease=600, limit=10)
    await a.settle(
        [r.but(status="filteredAsSpam", done=True) for r in rows if r.queue_id in ("Q1", "Q3")], owner="A"
    )
    counts = {(c.route, c.status): c.count for c in await a.outcomes(T0 - 3600)}
    assert counts == {("scans", "filteredAsSpam"): 1, ("scans", ""): 1, ("invoices", "filteredAsSpam"): 1}
    assert await a.purge(T0) == 0  # Q4 is old but not settled: kept
    assert len(await a.for_message("Q4")) == 1


async def test_rows_and_cursor_survive_a_reopen(lasting: tuple[str, Place], tmp_path: Path) -> None:
    backend, place = lasting
    store = place.store(backend)
    await store.open()
    await store.add([item(1), item(2)])
    [row, _] = await store.claim(owner="A", now=T0 + 60, lease=600, limit=10)
    await store.settle([row.but(status="pending", trace_id="t-1", checks=2, due=T0 + 120)], owner="A")
    await store.set_cursor(T0 + 5)
    await store.close()  # the relay stops with Q2 claimed: its lease runs out
    again = place.store(backend)
    await again.open()
    try:
        assert await again.cursor() == T0 + 5
        [q1] = await again.for_message("Q1")
        assert (q1.status, q1.trace_id, q1.checks, q1.due) == ("pending", "t-1", 2, T0 + 120)
        assert await again.claim(owner="B", now=T0 + 100, lease=600, limit=10) == []
        taken = await again.claim(owner="B", now=T0 + 661, lease=600, limit=10)
        assert [i.queue_id for i in taken] == ["Q2", "Q1"]  # oldest due first
    finally:
        await again.close()
    if backend == "sqlite":
        assert oct((tmp_path / "tracking.db").stat().st_mode & 0o777) == "0o600"


async def test_concurrent_claims_from_two_connections_never_overlap(lasting: tuple[str, Place]) -> None:
    """Two relays' passes at the same moment on one file or database: every row goes to exactly one
    of them (PostgreSQL: ``FOR UPDATE SKIP LOCKED``)."""
    a, b = await _two(lasting[1], lasting[0])
    try:
        await a.add([item(n) for n in range(400)])
        claims = await asyncio.gather(  # ten relays, five on each connection
            *(s.claim(owner=f"R{n}", now=T0 + 60, lease=600, limit=50) for n, s in enumerate([a, b] * 5))
        )
        taken = [i.queue_id for batch in claims for i in batch]
        assert len(taken) == len(set(taken)) == 400
    finally:
        await a.close()
        await b.close()


async def test_one_owner_leads_until_its_lease_ends_or_it_lets_go(stores: Pair) -> None:
    a, b = stores
    assert await a.lead(owner="A", now=T0, lease=600)
    assert not await b.lead(owner="B", now=T0 + 1, lease=600)
    assert await a.lead(owner="A", now=T0 + 500, lease=600)  # renewed
    assert not await b.lead(owner="B", now=T0 + 1000, lease=600)
    assert await b.lead(owner="B", now=T0 + 1101, lease=600)  # A's lead ran out
    await a.add([item(1), item(2)])
    assert len(await b.claim(owner="B", now=T0 + 1200, lease=600, limit=10)) == 2
    assert await b.release(owner="B") == 2  # B stops: its claims and its lead go at once
    assert await a.lead(owner="A", now=T0 + 1201, lease=600)
    assert len(await a.claim(owner="A", now=T0 + 1201, lease=600, limit=10)) == 2
