"""The admin HTTP endpoint (read-only): ``/metrics`` for Prometheus, ``/api/health`` and
``/api/queue`` as JSON. It binds to loopback unless configured otherwise and changes nothing: queue
operations stay with the ``relay365 queue`` commands, which need access to the spool itself."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay365.errors import SpoolError
from relay365.spool.model import QueueFilter, QueueState, entry_dict

if TYPE_CHECKING:
    from relay365.app import Relay

log = logging.getLogger(__name__)
QUEUE_LIMIT = 1000


async def _refresh(relay: Relay) -> dict[str, Any]:
    """Read the queue and connection state into the gauges; return it for the JSON views."""
    m = relay.metrics
    stats = await relay.spool.stats()
    now = relay.clock()
    m.set_queue(stats, now)
    connections = relay.ingress.limiter.active if relay.ingress else 0
    m.connections.set(connections)
    suspended = relay.scheduler.suspended() if relay.scheduler else {}
    for name in relay.transports:
        m.suspended.labels(name).set(1 if name in suspended else 0)
    stopped = relay.scheduler.delivery_stopped() if relay.scheduler else None
    m.delivery_stopped.set(0 if stopped is None else 1)
    return {
        "delivery": {"stopped": stopped is not None, "reason": stopped},
        "queue": {
            "recipients": stats.recipients,
            "held_messages": stats.held,
            "oldest_seconds": round(now - stats.oldest, 1) if stats.oldest is not None else None,
        },
        "connections": connections,
        "suspended_transports": {n: round(until - now, 1) for n, until in suspended.items()},
    }


def create_app(relay: Relay) -> Starlette:
    async def metrics(request: Request) -> Response:
        try:
            await _refresh(relay)
        except SpoolError as e:
            log.error("metrics: cannot read the spool: %s", e)
            return Response(f"spool unavailable: {e}\n", status_code=503, media_type="text/plain")
        return Response(generate_latest(relay.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def health(request: Request) -> Response:
        try:
            state = await _refresh(relay)
        except SpoolError as e:
            return JSONResponse({"status": "error", "error": f"spool unavailable: {e}"}, status_code=503)
        if state["delivery"]["stopped"]:  # mail is accepted (within the reserve) but not delivered
            return JSONResponse({"status": "degraded", "listeners": relay.ports, **state}, status_code=503)
        return JSONResponse({"status": "ok", "listeners": relay.ports, **state})

    async def queue(request: Request) -> Response:
        """``?limit=N&state=S&device=D&sender=P&recipient=P``: the filters of ``relay365 queue list``."""
        q = request.query_params
        raw = q.get("limit", "100")
        if not raw.isdigit() or not 1 <= int(raw) <= QUEUE_LIMIT:
            return JSONResponse(
                {"error": f"limit must be a whole number from 1 to {QUEUE_LIMIT}, not {raw!r}"},
                status_code=400,
            )
        state = q.get("state")
        if state is not None and state not in set(QueueState):
            choices = ", ".join(QueueState)
            return JSONResponse({"error": f"state must be one of {choices}, not {state!r}"}, status_code=400)
        where = QueueFilter(
            state=QueueState(state) if state is not None else None,
            device=q.get("device"),
            sender=q.get("sender"),
            recipient=q.get("recipient"),
        )
        try:
            page = await relay.spool.query(where, limit=int(raw))
        except SpoolError as e:
            return JSONResponse({"error": f"spool unavailable: {e}"}, status_code=503)
        return JSONResponse({"total": page.total, "messages": [entry_dict(e) for e in page.entries]})

    return Starlette(
        routes=[
            Route("/metrics", metrics),
            Route("/api/health", health),
            Route("/api/queue", queue),
        ]
    )


class AdminServer:
    """uvicorn on the relay's own event loop."""

    def __init__(self, relay: Relay, address: str, port: int) -> None:
        import uvicorn

        config = uvicorn.Config(
            create_app(relay),
            host=address,
            port=port,
            log_level="warning",
            log_config=None,  # its records go to the relay's handler: redacted, in the relay's format
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(), name="admin-http")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not self._server.started:
            if self._task.done() or loop.time() > deadline:
                await asyncio.gather(self._task, return_exceptions=True)
                raise OSError("the admin endpoint did not start (is the port in use?)")
            await asyncio.sleep(0.01)
        self.port = int(self._server.servers[0].sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
