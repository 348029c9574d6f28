"""Live updates by server-sent events (``/api/events``, HTML Living Standard 9.2).

The stream sends ``event: changed`` whenever the tracking log has a new event (every receipt,
attempt, outcome and admin action writes one) or a sandbox mailbox got mail; the pages' small script
(``static/live.js``) then reloads the part of the page it shows. Polling one integer per second per
open page costs nothing, needs no fan-out machinery, and works the same with several processes. A
stream ends after ``MAX_STREAM`` seconds; the browser's EventSource reconnects by itself.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from relay365.admin.console import Console

POLL = 1.0
PING = 15.0  # a comment line keeps proxies from closing an idle stream
MAX_STREAM = 600.0


def version(c: Console) -> str:
    """What a page was rendered from: the newest tracking event and the mailboxes' state. A page
    sends it back as ``?since=``, so a change between rendering and connecting is not missed."""
    boxes = c.deps.mailboxes
    return f"{c.deps.tracking.last_id()}-{boxes.version() if boxes is not None else 0.0}"


async def stream(c: Console, request: Request, *, poll: float = POLL) -> AsyncIterator[str]:
    yield "retry: 2000\n\n"
    last = request.query_params.get("since") or version(c)
    loop = asyncio.get_running_loop()
    start = since_ping = loop.time()
    while loop.time() - start < MAX_STREAM:
        await asyncio.sleep(poll)
        if await request.is_disconnected():
            return
        now = version(c)
        if now != last:
            last = now
            since_ping = loop.time()
            yield f"event: changed\ndata: {json.dumps({'version': now})}\n\n"
        elif loop.time() - since_ping > PING:
            since_ping = loop.time()
            yield ": ping\n\n"


async def events(c: Console, request: Request) -> Response:
    await c.guard.require(request)
    return StreamingResponse(
        stream(c, request), media_type="text/event-stream", headers={"x-accel-buffering": "no"}
    )
