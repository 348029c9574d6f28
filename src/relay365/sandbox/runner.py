"""``Sandbox``: run every endpoint of the sandbox tenant on the current event loop.

::

    async with Sandbox(example_tenant(), state_dir=Path("state")) as sandbox:
        sandbox.submission_port, sandbox.mx_port, sandbox.http_port, sandbox.authority, sandbox.ca_path

The HTTPS socket is bound first so the token issuer knows its own address; the HTTP application is
``relay365.sandbox.http.create_app(ctx)`` served by uvicorn with the sandbox's TLS context.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from relay365.admin.embedded import embedded_server
from relay365.errors import Relay365Error
from relay365.sandbox.clock import Clock
from relay365.sandbox.context import SandboxContext, create_context
from relay365.sandbox.mx import mx_endpoint
from relay365.sandbox.smtp_common import SmtpEndpoint
from relay365.sandbox.submission import submission_endpoint
from relay365.sandbox.tenant import Tenant

if TYPE_CHECKING:
    from starlette.applications import Starlette

logger = logging.getLogger(__name__)

_START_TIMEOUT = 10.0


class SandboxStartError(Relay365Error):
    """An endpoint of the sandbox could not start (port in use, HTTP app failed)."""


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise SandboxStartError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


class Sandbox:
    """The submission, MX and HTTPS endpoints of one tenant, as an async context manager."""

    def __init__(
        self,
        tenant: Tenant,
        *,
        state_dir: Path,
        serve_http: bool = True,
        clock: Clock | None = None,
        extra_client_cas: Sequence[Path] = (),
        http_app_options: dict[str, Any] | None = None,
    ) -> None:
        self._tenant = tenant
        self._state_dir = state_dir
        self._serve_http = serve_http
        self._clock = clock
        self._extra_client_cas = tuple(extra_client_cas)
        self._http_app_options = http_app_options or {}
        self._ctx: SandboxContext | None = None
        self._http_sock: socket.socket | None = None
        self._http_server: Any = None
        self.http_app: Starlette | None = None  # the HTTPS application (tests read its endpoints' state)
        self._http_task: asyncio.Task[None] | None = None
        self.submission: SmtpEndpoint | None = None
        self.mx: SmtpEndpoint | None = None
        self.http_port = 0

    # -- properties ---------------------------------------------------------------------------

    @property
    def ctx(self) -> SandboxContext:
        if self._ctx is None:
            raise RuntimeError("the sandbox is not running")
        return self._ctx

    @property
    def host(self) -> str:
        return self._tenant.host

    @property
    def submission_port(self) -> int:
        return self.submission.port if self.submission is not None else 0

    @property
    def mx_port(self) -> int:
        return self.mx.port if self.mx is not None else 0

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.http_port}"

    @property
    def authority(self) -> str:
        return f"{self.base_url}/{self._tenant.tenant_id}"

    @property
    def graph_url(self) -> str:
        return f"{self.base_url}/v1.0"

    @property
    def ca_path(self) -> Path:
        return self.ctx.tls.ca_pem_path

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Sandbox:
        tenant = self._tenant
        self._http_sock = _bind(tenant.host, tenant.http_port)
        self.http_port = int(self._http_sock.getsockname()[1])
        host = f"[{tenant.host}]" if ":" in tenant.host else tenant.host
        try:
            self._ctx = create_context(
                tenant,
                state_dir=self._state_dir,
                issuer_host=f"{host}:{self.http_port}",
                clock=self._clock,
                extra_client_cas=self._extra_client_cas,
            )
            self.submission = submission_endpoint(self._ctx)
            await self.submission.start(host=tenant.host, port=tenant.submission_port)
            self.mx = mx_endpoint(self._ctx)
            await self.mx.start(host=tenant.host, port=tenant.mx_port)
            if self._serve_http:
                await self._start_http(self._ctx)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _start_http(self, ctx: SandboxContext) -> None:
        import uvicorn

        from relay365.sandbox.http import create_app

        assert self._http_sock is not None
        self.http_app = create_app(ctx, **self._http_app_options)
        config = uvicorn.Config(
            self.http_app,
            ssl_certfile=str(ctx.tls.cert_path),
            ssl_keyfile=str(ctx.tls.key_path),
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=2,
            date_header=False,  # the app sends Date itself, from the sandbox clock
        )
        config.load()
        config.ssl = ctx.tls.server_context()  # TLS 1.2 minimum, as Microsoft's endpoints
        server = embedded_server(config)  # the program running the sandbox owns the signals
        self._http_server = server
        self._http_task = asyncio.create_task(server.serve(sockets=[self._http_sock]))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_TIMEOUT
        while not server.started:
            if self._http_task.done() or loop.time() > deadline:
                raise SandboxStartError("the sandbox HTTPS endpoint did not start")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Stop every endpoint (idempotent)."""
        if self._http_task is not None:
            self._http_server.should_exit = True
            # Clients that keep a TLS connection alive (aiohttp, httpx pools) would hold uvicorn's
            # graceful shutdown until its timeout and leave the sockets to the garbage collector:
            # the sandbox is going away, so its connections end now.
            for connection in list(getattr(self._http_server.server_state, "connections", ())):
                transport = getattr(connection, "transport", None)
                if isinstance(transport, asyncio.WriteTransport):
                    transport.abort()
            try:
                await asyncio.wait_for(self._http_task, timeout=_START_TIMEOUT)
            except (TimeoutError, asyncio.CancelledError, SystemExit):
                logger.warning("the sandbox HTTPS endpoint did not stop cleanly")
            self._http_task = None
        for endpoint in (self.submission, self.mx):
            if endpoint is not None:
                await endpoint.close()
        if self._http_sock is not None:
            self._http_sock.close()
            self._http_sock = None
