"""The trace follower on the PostgreSQL spool: two relays on one database follow one delivered message
into the mailbox through the sandbox's message trace (Graph), and Microsoft is asked about it by one
of them only (the follow store lives in the database: tracing/work_pg.py).

The sandbox and both relays run on one manual clock; the follower passes are driven by the test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay365.observability.tracking import EventKind, TraceQuery
from relay365.sandbox.clock import ManualClock
from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import load_tenant
from relay365.service.relay import Relay
from relay365.settings import load_settings
from relay365.tracing.work_pg import PgFollowStore
from tests.m365.follow_helpers import follow_sections, submit, tenant_file, until
from tests.support import APP_SECRET, SECRET_ENV, PgDatabase, write_config

pytestmark = pytest.mark.timeout(300)
PASSWORD_ENV = "RELAY365_TEST_PG_PASSWORD"


@pytest.fixture
async def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Sandbox]:
    monkeypatch.setenv(SECRET_ENV, APP_SECRET)
    tenant = load_tenant(tenant_file(tmp_path))
    async with Sandbox(tenant, state_dir=tmp_path / "sandbox", clock=ManualClock()) as sb:
        yield sb


def trace_requests(sb: Sandbox) -> int:
    """Message trace requests the sandbox's Graph accepted in the tenant's running window."""
    assert sb.http_app is not None
    limits = sb.ctx.tenant.limits
    used: int = sb.http_app.state.trace.quota.used(now=sb.ctx.clock.now(), window=limits.trace_window_seconds)
    return used


def node(tmp_path: Path, name: str, sb: Sandbox, pg: PgDatabase) -> Relay:
    home = tmp_path / name
    home.mkdir()
    config = write_config(
        home,
        server={"hostname": f"{name}.test", "spool_dir": str(home / "var"), "auth_failure_delay": 0.0},
        spool={"url": pg.url, "password_env": PASSWORD_ENV},
        listener=[{"name": "lan", "port": 0, "tls": "none"}],
        **follow_sections(sb),
    )
    return Relay(load_settings(config), clock=sb.ctx.clock.now)


async def test_two_relays_on_one_pg_spool_ask_microsoft_about_a_message_once(
    tmp_path: Path, sandbox: Sandbox, pg: PgDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, pg.password)
    clock = sandbox.ctx.clock
    a, b = node(tmp_path, "a", sandbox, pg), node(tmp_path, "b", sandbox, pg)
    await a.start()
    await b.start()
    try:
        assert a.follower is not None and b.follower is not None
        assert isinstance(a.follower.store, PgFollowStore) and isinstance(b.follower.store, PgFollowStore)
        qid = await submit(a, "scanner@contoso.test", "alice@contoso.test", "Scan floor 2", 1)
        await until(lambda: len(sandbox.ctx.store.list(mailbox="alice@contoso.test")) == 1)
        for relay in (a, b):
            assert relay.scheduler is not None
            await relay.scheduler.drain()
            await relay.tracking.flush()
        taken = await asyncio.gather(a.follower.run_once(), b.follower.run_once())
        assert sum(r.taken_in for r in taken) == 1  # both read the delivered event: one row
        assert trace_requests(sandbox) == 0  # not due before the poll interval
        clock.advance(120)
        reports = await asyncio.gather(a.follower.run_once(), b.follower.run_once())
        assert sum(r.asked for r in reports) == 1 and sum(r.settled for r in reports) == 1
        asked = trace_requests(sandbox)
        assert asked >= 1 and asked == a.follower.requests + b.follower.requests
        assert min(a.follower.requests, b.follower.requests) == 0  # one of them asked Microsoft
        for _ in range(3):  # the status is final: nobody asks again
            clock.advance(120)
            later = await asyncio.gather(a.follower.run_once(), b.follower.run_once())
            assert sum(r.asked for r in later) == 0
        assert a.follower.requests + b.follower.requests == asked
        await a.tracking.flush()
        await b.tracking.flush()
        page = await a.tracking.search(TraceQuery(queue_id=qid, kinds=(EventKind.M365_STATUS,)))
        assert [(e.recipient, e.reply) for e in page.events] == [("alice@contoso.test", "Delivered")]
        [row] = await b.follower.store.for_message(qid)  # either node sees the shared row
        assert row.done and row.status.lower() == "delivered" and row.checks >= 1
    finally:
        await b.stop(grace=5)
        await a.stop(grace=5)
