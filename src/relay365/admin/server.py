"""The admin service: the console app (pages + API + live events + static files) behind the security
middleware, served by uvicorn on the relay's own event loop, over TLS when configured."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from relay365.admin import sse
from relay365.admin.accounts import AccountStore
from relay365.admin.api import api_routes
from relay365.admin.auth import Forbidden, Guard, NotLoggedIn
from relay365.admin.console import Console
from relay365.admin.embedded import embedded_server
from relay365.admin.pages import environment, page_routes
from relay365.admin.ports import ConsoleDeps
from relay365.admin.security import SecurityMiddleware
from relay365.admin.sessions import LoginThrottle, SessionStore
from relay365.settings import AdminSettings


def build_console(
    deps: ConsoleDeps,
    settings: AdminSettings,
    *,
    accounts: AccountStore,
    clock: Callable[[], float] = time.time,
) -> Console:
    guard = Guard(
        accounts=accounts,
        sessions=SessionStore(lifetime=settings.session_hours * 3600, clock=clock),
        throttle=LoginThrottle(limit=settings.login_failures, lockout=settings.lockout_seconds, clock=clock),
        tracking=deps.tracking,
        secure_cookie=settings.tls,
    )
    return Console(deps=deps, guard=guard, open_metrics=settings.open_metrics, tls=settings.tls)


def create_app(console: Console, settings: AdminSettings) -> Starlette:
    env = environment()

    async def not_logged_in(request: Request, exc: Exception) -> Response:
        if request.url.path.startswith("/api") or request.url.path == "/metrics":
            return JSONResponse({"error": "log in or send an API token"}, status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/login?" + urllib.parse.urlencode({"next": target}), status_code=303)

    async def forbidden(request: Request, exc: Exception) -> Response:
        if request.url.path.startswith("/api"):
            return JSONResponse({"error": str(exc)}, status_code=403)
        caller = console.guard.caller(request)
        html = env.get_template("error.html").render(
            who=caller.principal if caller else None,
            csrf=caller.csrf if caller else "",
            path=request.url.path,
            sandbox=console.deps.mailboxes is not None,
            error=str(exc),
        )
        return HTMLResponse(html, status_code=403)

    async def events(request: Request) -> Response:
        return await sse.events(console, request)

    hosts = [settings.address, *settings.allowed_hosts]
    return Starlette(
        routes=[
            *api_routes(console),
            Route("/api/events", events),
            *page_routes(console),
            Mount("/static", StaticFiles(packages=[("relay365.admin", "static")]), name="static"),
        ],
        middleware=[Middleware(SecurityMiddleware, allowed_hosts=hosts, tls=settings.tls)],
        exception_handlers={NotLoggedIn: not_logged_in, Forbidden: forbidden},
    )


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # as Microsoft's endpoints; browsers need no less
    ctx.load_cert_chain(cert, key)
    return ctx


class AdminServer:
    """uvicorn on the relay's own event loop."""

    def __init__(
        self, app: Starlette, *, address: str, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        import uvicorn

        config = uvicorn.Config(
            app,
            host=address,
            port=port,
            log_level="warning",
            log_config=None,  # its records go to the relay's handler: redacted, in the relay's format
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        config.load()
        config.ssl = ssl_context
        self._server = embedded_server(config)  # `relay365 serve` owns SIGTERM and SIGINT
        self._task: asyncio.Task[None] | None = None
        self._address = address
        self._port = port
        self.port = 0
        self.scheme = "https" if ssl_context is not None else "http"

    def _bind(self) -> socket.socket:
        """The listening socket, bound here: a port in use is an ``OSError`` for the caller to report
        (uvicorn, binding it itself, would log it and ``sys.exit`` from inside the event loop)."""
        family = socket.AF_INET6 if ":" in self._address else socket.AF_INET
        try:
            sock = socket.create_server((self._address, self._port), family=family, backlog=2048)
        except OSError as e:
            raise OSError(e.errno, f"admin endpoint {self._address}:{self._port}: {e.strerror}") from None
        sock.setblocking(False)
        return sock

    async def start(self) -> None:
        sock = self._bind()
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="admin-http")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not self._server.started:
            if self._task.done() or loop.time() > deadline:
                self._server.should_exit = True
                await asyncio.gather(self._task, return_exceptions=True)
                sock.close()
                raise OSError("the admin endpoint did not start")
            await asyncio.sleep(0.01)
        self.port = int(self._server.servers[0].sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
