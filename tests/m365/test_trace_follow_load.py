"""The follower at volume: 2,000 messages handed to the sandbox's MX, followed until every recipient has
a final status, inside Microsoft's 100 trace requests per 5 minutes (the sandbox counts 429s: none),
across a restart of the follower.

The deliveries are written to a real tracking log as the relay's scheduler writes them (``routed``,
then ``delivered`` with the 250), and the messages really reach the sandbox over SMTP, so the trace
the follower reads is the one Exchange's mail flow made. Sandbox, follower, request budget and pauses
share one manual clock: the 20 minutes the quota needs pass in no time.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from relay365.observability.metrics import Metrics
from relay365.observability.tracking import EventKind, TraceQuery, TrackingEvent
from relay365.observability.tracking_sqlite import SqliteTrackingLog
from relay365.sandbox.clock import ManualClock
from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import load_tenant
from relay365.settings import Settings
from relay365.tracing.follower import TraceFollower
from relay365.tracing.work_sqlite import SqliteFollowStore
from tests.conftest import make_settings
from tests.m365.conftest import APP_SECRET, SECRET_ENV
from tests.m365.follow_helpers import follow_sections, tenant_file

pytestmark = pytest.mark.timeout(600)
MESSAGES = 2000


def kind_of(n: int) -> tuple[str, str, str]:
    """(sender, subject, expected status): 20 quarantined by the tenant's rule, 200 in Junk Email
    (fabrikam.test's SPF lacks the office IP), the rest delivered; 20 of those have no Message-ID."""
    if n % 100 == 7:
        return "scanner@contoso.test", f"[quarantine-test] Scan {n}", "Quarantined"
    if n % 10 == 3:
        return "bob@fabrikam.test", f"Scan {n}", "FilteredAsSpam"
    return "scanner@contoso.test", f"Scan {n}", "Delivered"


def message(n: int) -> EmailMessage:
    sender, subject, _ = kind_of(n)
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, "alice@contoso.test", subject
    if n % 100 != 50:
        msg["Message-ID"] = f"<scan-{n}@relay.contoso.test>"
    msg.set_content("page\n")
    return msg


async def hand_over(sb: Sandbox, tracking: SqliteTrackingLog, numbers: range) -> None:
    """Direct Send of these messages over four SMTP sessions, each 250 recorded as the scheduler does."""

    async def session(part: list[int]) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sb.mx_port, start_tls=False, timeout=30)
        await client.connect()
        for n in part:
            sender, subject, _ = kind_of(n)
            msg = message(n)
            errors, reply = await client.sendmail(sender, ["alice@contoso.test"], msg.as_bytes())
            assert errors == {}
            mid = f"scan-{n}@relay.contoso.test" if n % 100 != 50 else ""
            common = {
                "queue_id": f"Q{n:05d}", "message_id": mid,
                "subject": subject, "sender": sender, "recipient": "alice@contoso.test", "device": "mfp",
                "transport": "direct",
            }  # fmt: skip
            now = sb.ctx.clock.now()
            tracking.record(TrackingEvent(kind=EventKind.ROUTED, at=now, detail="scans: catch-all", **common))
            tracking.record(TrackingEvent(kind=EventKind.DELIVERED, at=now, reply=f"250 {reply}", **common))
        await client.quit()

    await asyncio.gather(*(session(list(numbers)[i::4]) for i in range(4)))
    await tracking.flush()


def follower(
    settings: Settings, tracking: SqliteTrackingLog, clock: ManualClock, metrics: Metrics
) -> TraceFollower:
    async def pause(seconds: float) -> None:
        clock.advance(seconds)
        await asyncio.sleep(0)

    store = SqliteFollowStore(settings.server.spool_dir / "tracking.db")
    return TraceFollower(
        settings=settings, tracking=tracking, store=store, metrics=metrics, clock=clock.now,
        monotonic=clock.now, sleep=pause,
    )  # fmt: skip


async def passes(f: TraceFollower, clock: ManualClock, limit: int) -> int:
    """Run passes as the follower's loop would, the clock jumping to the next due row; stop after
    ``limit`` passes or when nothing is left."""
    done = 0
    while done < limit:
        await f.run_once()
        done += 1
        nxt = await f.store.next_due()
        if nxt is None:
            break
        clock.advance(max(0.0, nxt - clock.now()))
    return done


async def test_two_thousand_messages_followed_within_the_quota_across_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, APP_SECRET)
    clock = ManualClock()
    tenant = load_tenant(tenant_file(tmp_path))
    async with Sandbox(tenant, state_dir=tmp_path / "sandbox", clock=clock) as sb:
        settings = make_settings(tmp_path, **follow_sections(sb))
        db = settings.server.spool_dir / "tracking.db"
        tracking = SqliteTrackingLog(db, clock=clock.now, log_events=False)
        await tracking.open(purge_every=None)
        try:
            for batch in range(4):  # four bursts of scans, an hour apart
                await hand_over(sb, tracking, range(batch * 500, batch * 500 + 500))
                clock.advance(3600)
            assert len(sb.ctx.trace.records()) == MESSAGES
            start = clock.now()

            metrics = Metrics()  # one registry for both lives of the follower
            first = follower(settings, tracking, clock, metrics)
            await first.store.open()
            await passes(first, clock, limit=3)
            asked_before = first.requests
            await first.stop()  # a restart: what is pending lives in tracking.db
            second = follower(settings, tracking, clock, metrics)
            await second.store.open()
            ran = await passes(second, clock, limit=200)
            assert await second.store.next_due() is None, f"still pending after {ran} passes"
            requests, throttled = asked_before + second.requests, second.throttled
            await second.stop()

            assert not [k for k in sb.ctx.store.rejections() if " 429 " in k]  # never throttled
            assert throttled == 0
            await tracking.flush()
            statuses: dict[str, str] = {}
            query = TraceQuery(kinds=(EventKind.M365_STATUS,), limit=1000)
            while True:
                page = await tracking.search(query)
                statuses.update({e.queue_id: e.reply for e in page.events})
                if page.next_cursor is None:
                    break
                query = TraceQuery(kinds=(EventKind.M365_STATUS,), limit=1000, before=page.next_cursor)
            assert statuses == {f"Q{n:05d}": kind_of(n)[2] for n in range(MESSAGES)}
            counts = Counter(statuses.values())
            assert counts == {"Delivered": 1780, "FilteredAsSpam": 200, "Quarantined": 20}
            for status, n in counts.items():
                sample = {"status": status, "route": "scans", "transport": "direct"}
                assert metrics.registry.get_sample_value("relay365_m365_outcomes_total", sample) == n
            # One list per envelope sender (the window is narrowed by senderAddress), one per hour of
            # handoff for the 20 messages without a Message-ID (narrowed by recipient, matched by
            # subject and time; four bursts an hour apart), then one getDetailsByRecipient for each
            # of the 220 that did not reach the Inbox; nothing is asked twice across the restart.
            assert requests == 2 + 4 + 220, requests
            # Paced: a burst of 20 per life of the follower, then 60 more per 5 minutes (80 in all).
            assert clock.now() - start >= (requests - 2 * 20) / (60 / 300)
        finally:
            await tracking.close()
