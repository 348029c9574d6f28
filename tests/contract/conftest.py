"""One fixture over every spool backend: the contract suite (test_spool_contract.py) runs against each.

A ``Backend`` opens handles on one shared store; each handle stands for one process (its own
connection, its own owner). ``crash`` is that process's death: its lock goes, nothing is cleaned up.
PostgreSQL gets a fresh database per test (tests/pgcluster.py: a private cluster for the session).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from relay365.spool.contract import Spool
from relay365.spool.memory import MemorySpool, MemoryStore
from relay365.spool.postgres import PgSpool, PgTarget
from relay365.spool.sqlite import SqliteSpool
from tests.core.helpers import Clock
from tests.pgcluster import PgDatabase


class Backend:
    def __init__(self, name: str, tmp_path: Path, pg: PgDatabase | None = None) -> None:
        self.name = name
        self.pg = pg  # (the PostgreSQL backend's database: a fresh one per test)
        self.clock = Clock()
        self.tmp_path = tmp_path
        self.store = MemoryStore()  # (the memory backend's shared store)
        self._open: list[Spool] = []

    def new(self) -> Spool:
        return FACTORIES[self.name](self)

    async def open(self, owner: str | None = None) -> Spool:
        """A new handle (another process) on the same spool; with ``owner``, recovered as that
        owner, as a delivering process starts."""
        spool = self.new()
        await spool.open()
        self._open.append(spool)
        if owner is not None:
            await spool.recover(owner)
        return spool

    async def crash(self, spool: Spool) -> None:
        """The process behind ``spool`` dies: nothing of it is aborted, released or cleaned up."""
        self._open.remove(spool)
        await spool.close()

    async def close_all(self) -> None:
        for spool in self._open:
            with contextlib.suppress(Exception):
                await spool.close()
        self._open.clear()


FACTORIES: dict[str, Callable[[Backend], Spool]] = {
    "memory": lambda b: MemorySpool(b.store, clock=b.clock),
    "sqlite": lambda b: SqliteSpool(b.tmp_path / "spool", clock=b.clock),
    "postgres": lambda b: PgSpool(PgTarget(url=b.pg.url, password=b.pg.password), clock=b.clock),  # type: ignore[union-attr]
}


@pytest.fixture(params=list(FACTORIES))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    pg = request.getfixturevalue("pg") if request.param == "postgres" else None
    b = Backend(request.param, tmp_path, pg)
    try:
        yield b
    finally:
        await b.close_all()
