"""Pacing against the sandbox: N messages for M mailboxes drain within 1.05x the minimum time the
limits allow, never faster than the limits (so Microsoft never throttles), with zero throttling."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from pathlib import Path

import pytest

from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import example_tenant
from tests.conftest import make_settings, running_relay
from tests.m365.conftest import APP_SECRET, SECRET_ENV, submission
from tests.m365.test_smtp_transports import send, wait_until

# 5 messages per 15 s: 11 messages need at least 30 s. The window is not shorter because the 1.05x
# bound must leave room for the relay's scheduling latency at each window boundary on a loaded 2-core
# machine (about 0.6 s measured under load; 1.5 s of slack here).
LIMIT, WINDOW, PER_MAILBOX = 5, 15, 11
MAILBOXES = ("scanner@contoso.test", "alice@contoso.test")


async def test_pacing_drains_at_the_limit_without_throttling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, APP_SECRET)
    base = example_tenant()
    apps = {k: replace(a, mailboxes=None) for k, a in base.apps.items()}  # the app may use both
    tenant = replace(
        base,
        apps=apps,
        limits=replace(base.limits, messages_per_minute=LIMIT, submission_window_seconds=WINDOW),
    )
    async with Sandbox(tenant, state_dir=tmp_path / "sb") as sb:
        transports = [
            submission(sb, name=f"m{i}", mailbox=m, messages_per_minute=LIMIT, pacing_window=WINDOW)
            for i, m in enumerate(MAILBOXES)
        ]
        routes = [{"name": f"as-{m}", "transport": f"m{i}", "senders": [m]} for i, m in enumerate(MAILBOXES)]
        settings = make_settings(
            tmp_path, transport=transports, route=routes, delivery={"concurrency": 20, "poll_interval": 0.5}
        )
        async with running_relay(settings) as relay:
            await asyncio.gather(
                *(
                    send(relay, m, ["bob@fabrikam.test"], f"From: {m}\r\nSubject: {i}\r\n\r\nx\r\n".encode())
                    for m in MAILBOXES
                    for i in range(PER_MAILBOX)
                )
            )
            store = sb.ctx.store
            total = len(MAILBOXES) * PER_MAILBOX
            await wait_until(lambda: len(store.list(mailbox="bob@fabrikam.test")) == total, 60)
        minimum = math.floor((PER_MAILBOX - 1) / LIMIT) * WINDOW
        for mailbox in MAILBOXES:
            times = sorted(
                m.received_at for m in store.list(mailbox="bob@fabrikam.test") if m.mail_from == mailbox
            )
            assert len(times) == PER_MAILBOX
            span = times[-1] - times[0]
            # Never faster than the limits allow, and within 5 % of that minimum.
            for i in range(LIMIT, len(times)):
                assert times[i] - times[i - LIMIT] >= WINDOW - 0.01, (mailbox, i, times)
            print(f"pacing {mailbox}: span {span:.3f}s, minimum {minimum}s, ratio {span / minimum:.4f}")
            assert minimum <= span <= 1.05 * minimum, (mailbox, span, minimum)
        assert store.rejections() == {}  # not one 432, 451 or "submission throttled"
