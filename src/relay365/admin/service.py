"""The admin service: the console and its API (uvicorn on the relay's own event loop) as one async
context manager, built from the console's interfaces (``ports.ConsoleDeps``) and nothing else.

::

    async with AdminService(deps=..., settings=s.admin, accounts=...) as admin:
        admin.url        # https://127.0.0.1:8025/ (the bound port when the config says 0)
        admin.console    # the guard (accounts, sessions) and what every view reads
    # on the way out: uvicorn stops (open requests get ``timeout_graceful_shutdown``)

Starting fails with ``OSError`` when the endpoint cannot be bound (a port in use).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from relay365.admin.accounts import AccountStore
from relay365.admin.console import Console
from relay365.admin.ports import ConsoleDeps
from relay365.admin.server import AdminServer, build_console, create_app, tls_context
from relay365.settings import AdminSettings

log = logging.getLogger(__name__)


class AdminService:
    def __init__(
        self,
        *,
        deps: ConsoleDeps,
        settings: AdminSettings,
        accounts: AccountStore,
        certificate: tuple[Path, Path] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``certificate``: (cert, key) PEM files, used when ``settings.tls``."""
        if settings.port is None:
            raise ValueError("the admin endpoint is off (admin.port is not set)")
        self._settings = settings
        self._accounts = accounts
        self.console: Console = build_console(deps, settings, accounts=accounts, clock=clock)
        self.app = create_app(self.console, settings)
        context = None
        if settings.tls:
            if certificate is None:
                raise ValueError("admin.tls is on: give the certificate and key")
            context = tls_context(*certificate)
        self.server = AdminServer(self.app, address=settings.address, port=settings.port, ssl_context=context)

    async def __aenter__(self) -> Self:
        await self.server.start()
        log.info("admin console on %s", self.url)
        if not self._accounts.users():
            log.warning("no admin accounts yet: create one with 'relay365 admin passwd NAME'")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.server.stop()

    @property
    def port(self) -> int:
        """The bound port (0 until started)."""
        return self.server.port

    @property
    def url(self) -> str:
        host = self._settings.address
        host = f"[{host}]" if ":" in host else host
        return f"{self.server.scheme}://{host}:{self.server.port}/"
