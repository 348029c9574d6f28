"""Which transport objects deliveries are using right now, so that a transport replaced by a reload is
closed only once the deliveries it carries have finished (they end on the transport they started on;
the next attempt goes through the new one)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from relay365.transports.base import Transport


class TransportUse:
    def __init__(self) -> None:
        self._count: dict[int, int] = {}  # id(transport) -> deliveries using it now
        self._idle = asyncio.Event()

    @contextlib.contextmanager
    def using(self, transport: Transport) -> Iterator[None]:
        key = id(transport)
        self._count[key] = self._count.get(key, 0) + 1
        try:
            yield
        finally:
            left = self._count[key] - 1
            if left:
                self._count[key] = left
            else:
                del self._count[key]
                self._idle.set()

    def in_use(self, transport: Transport) -> int:
        return self._count.get(id(transport), 0)

    async def idle(self, transport: Transport) -> None:
        """Return once no delivery uses ``transport``."""
        while self.in_use(transport):
            self._idle.clear()
            await self._idle.wait()
