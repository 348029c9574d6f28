"""One fixture over every spool backend: the contract suite (test_spool_contract.py) runs against each.

A ``Backend`` opens handles on one shared store; each handle stands for one process (its own
connection, its own owner). ``crash`` is that process's death: its lock goes, nothing is cleaned up.
The PostgreSQL spool (issue 10) adds its name to ``BACKENDS`` and a branch in ``backend``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay365.spool.contract import Spool
from relay365.spool.memory import MemorySpool, MemoryStore
from relay365.spool.sqlite import SqliteSpool
from tests.core.helpers import Clock

BACKENDS = ["memory", "sqlite"]


class Backend:
    def __init__(self, name: str, tmp_path: Path) -> None:
        self.name = name
        self.clock = Clock()
        self._dir = tmp_path / "spool"
        self._store = MemoryStore()
        self._open: list[Spool] = []

    def new(self) -> Spool:
        if self.name == "memory":
            return MemorySpool(self._store, clock=self.clock)
        return SqliteSpool(self._dir, clock=self.clock)

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


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    b = Backend(request.param, tmp_path)
    try:
        yield b
    finally:
        await b.close_all()
