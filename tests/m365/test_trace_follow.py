"""Device -> relay365 -> sandbox, then relay365 follows the message into the mailbox through the
sandbox's message trace (Graph, tokens from the real msal flow) and explains what happened after 250.

The sandbox and the relay run on one manual clock: the follower's passes are driven by the test
(``relay.follower.run_once()`` after the clock moved past the poll interval), so nothing waits on
wall-clock time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from relay365.diagnostics.checks import Status
from relay365.diagnostics.doctor_config import ConfigDoctorOptions, run_config_doctor
from relay365.observability.tracking import EventKind, TraceQuery, TrackingEvent
from relay365.sandbox.clock import ManualClock
from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import load_tenant
from relay365.service.relay import Relay
from relay365.settings import load_settings
from relay365.tracing.follower import LEASE, TraceFollower
from relay365.tracing.work_sqlite import SqliteFollowStore
from tests.console.support import bearer, make_accounts
from tests.core.helpers import closed_port, run_cli, write_config
from tests.m365.conftest import APP_SECRET, SECRET_ENV, oauth, submission
from tests.m365.follow_helpers import (
    MAIL_ONLY,
    follow_sections,
    publish_spf,
    submit,
    tenant_file,
    trace_json,
    until,
)

pytestmark = pytest.mark.timeout(300)
SPF_RECORD = "v=spf1 ip4:203.0.113.5 include:spf.protection.outlook.com ~all"


@pytest.fixture
async def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Sandbox]:
    monkeypatch.setenv(SECRET_ENV, APP_SECRET)
    extra = f'\n[[app]]\nclient_id = "{MAIL_ONLY}"\nclient_secret = "{APP_SECRET}"\n'
    extra += 'permissions = ["Mail.Send"]\n'  # an app of the tenant without the trace permission
    extra += '\n[[rule]]\nname = "No orders"\nsubject_contains = ["[reject-test]"]\naction = "reject"\n'
    tenant = load_tenant(tenant_file(tmp_path, extra))
    async with Sandbox(tenant, state_dir=tmp_path / "sandbox", clock=ManualClock()) as sb:
        yield sb


def started(settings_path: Path, sb: Sandbox) -> Relay:
    return Relay(load_settings(settings_path), clock=sb.ctx.clock.now)


def outcome(relay: Relay, status: str) -> float:
    value = relay.metrics.registry.get_sample_value(
        "relay365_m365_outcomes_total", {"status": status, "route": "scans", "transport": "direct"}
    )
    return value or 0.0


async def test_direct_send_outside_spf_lands_in_junk_and_spf_fixes_it(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    clock = sandbox.ctx.clock
    config = write_config(tmp_path, **follow_sections(sandbox))
    relay = started(config, sandbox)
    await relay.start()
    try:
        assert relay.follower is not None
        qid = await submit(relay, "scanner@fabrikam.test", "alice@contoso.test", "Scan floor 3", 1)
        store = sandbox.ctx.store
        await until(lambda: len(store.list(mailbox="alice@contoso.test")) == 1)
        [junk] = store.list(mailbox="alice@contoso.test")
        assert junk.folder == "JunkEmail"  # Microsoft said 250, and the scan is in Junk Email
        assert relay.scheduler is not None
        await relay.scheduler.drain()
        await relay.tracking.flush()

        early = await relay.follower.run_once()  # Microsoft's trace is asked poll_interval after 250
        assert (early.taken_in, early.asked) == (1, 0)
        clock.advance(120)
        report = await relay.follower.run_once()
        assert (report.asked, report.settled) == (1, 1)
        await relay.tracking.flush()

        events = await trace_json(config, "--recipient", "alice@contoso.test")
        assert [e["side"] for e in events][:4] == ["microsoft"] * 4  # newest first: Microsoft's half
        status = next(e for e in events if e["kind"] == "m365_status")
        assert status["reply"] == "FilteredAsSpam" and status["queue_id"] == qid
        assert status["peer"] == "203.0.113.5"  # fromIP: where Microsoft saw it come from
        assert "Spam Diagnostics" in status["detail"] and "SPF=fail" in status["detail"]
        assert SPF_RECORD in status["advice"] and "relay365 spf --domain fabrikam.test" in status["advice"]
        assert status["advice_source"].startswith("https://learn.microsoft.com/")
        kinds = [e["kind"] for e in reversed(events)]  # oldest first: relay, then Microsoft
        assert kinds == ["received", "routed", "attempted", "delivered", "m365_event", "m365_event",
                         "m365_event", "m365_status"]  # fmt: skip
        assert [e["reply"] for e in reversed(events) if e["kind"] == "m365_event"] == [
            "Receive", "Spam Diagnostics", "Deliver"
        ]  # fmt: skip
        assert outcome(relay, "FilteredAsSpam") == 1

        table = await _run(config, "--queue-id", qid)
        assert "Microsoft 365" in table and "FilteredAsSpam" in table and SPF_RECORD in table

        # The admin publishes the record relay365 advised; the next scan reaches the Inbox.
        publish_spf(config.parent / "tenant.toml", sandbox)
        second = await submit(relay, "scanner@fabrikam.test", "alice@contoso.test", "Scan floor 3", 2)
        await until(lambda: len(store.list(mailbox="alice@contoso.test", folder="Inbox")) == 1)
        await relay.scheduler.drain()
        await relay.tracking.flush()
        clock.advance(120)
        await relay.follower.run_once()
        await relay.tracking.flush()
        events = await trace_json(config, "--queue-id", second)
        [status] = [e for e in events if e["kind"] == "m365_status"]
        assert status["reply"] == "Delivered" and status["advice"] is None
        assert outcome(relay, "Delivered") == 1 and outcome(relay, "FilteredAsSpam") == 1
    finally:
        await relay.stop(grace=5)


async def _run(config: Path, *args: str) -> str:
    done = await asyncio.to_thread(run_cli, "trace", *args, "-c", str(config))
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_quarantine_and_failure_after_250_are_explained_in_the_console(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    clock = sandbox.ctx.clock
    config = write_config(tmp_path, admin={"port": 0}, **follow_sections(sandbox))
    token, _ = make_accounts(tmp_path / "spool" / "admin-users.json")
    relay = started(config, sandbox)
    await relay.start()
    try:
        assert relay.follower is not None and relay.scheduler is not None
        subject = "[quarantine-test] Invoice"  # the example tenant's mail flow rule quarantines it
        qid = await submit(relay, "scanner@contoso.test", "alice@contoso.test", subject, 3)
        failed = await submit(relay, "scanner@contoso.test", "alice@contoso.test", "[reject-test] Order", 4)
        await until(lambda: len(sandbox.ctx.store.list(folder="Quarantine")) == 1)
        await until(lambda: len(sandbox.ctx.store.list(mailbox="scanner@contoso.test")) == 1)  # the NDR
        await relay.scheduler.drain()
        await relay.tracking.flush()
        clock.advance(120)
        await relay.follower.run_once()
        await relay.tracking.flush()
        async with httpx.AsyncClient(base_url=relay.admin_url, trust_env=False, timeout=20) as http:
            message = (await http.get(f"/api/queue/{qid}", headers=bearer(token))).json()
            [ms] = message["microsoft"]
            assert ms["recipient"] == "alice@contoso.test" and ms["status"] == "Quarantined"
            assert "Transport rule" in ms["reason"] and "Quarantine suspicious invoices" in ms["reason"]
            assert "https://security.microsoft.com/quarantine" in ms["advice"]
            assert [e["event"] for e in ms["events"]] == ["Receive", "Transport rule", "Quarantine"]
            sides = [e["side"] for e in message["events"]]
            assert sides[0] == "relay" and sides[-1] == "microsoft"  # one timeline, oldest first
            page = await http.get(f"/message/{qid}", headers=bearer(token))
            assert page.status_code == 200
            assert "Inside Microsoft 365" in page.text and "Quarantined" in page.text
            assert "security.microsoft.com/quarantine" in page.text
            # Microsoft said 250, then a mail flow rule refused it: Failed, with the catalogue's meaning.
            [fail] = (await http.get(f"/api/queue/{failed}", headers=bearer(token))).json()["microsoft"]
            assert fail["status"] == "Failed" and "550 5.7.1 Delivery not authorized" in fail["reason"]
            assert "mail flow rule" in fail["advice"] and "Fix:" in fail["advice"]
            overview = (await http.get("/api/overview", headers=bearer(token))).json()
            assert overview["post_acceptance"] == [
                {
                    "route": "scans",
                    "transport": "direct",
                    "total": 2,
                    "statuses": {"Failed": 1, "Quarantined": 1},
                }
            ]
            search = await http.get("/trace", params={"queue_id": qid}, headers=bearer(token))
            assert "Microsoft 365" in search.text and "security.microsoft.com/quarantine" in search.text
            home = await http.get("/", headers=bearer(token))
            assert "Inside Microsoft 365 (last 24 hours)" in home.text
            metrics = (await http.get("/metrics")).text
            assert (
                'relay365_m365_outcomes_total{route="scans",status="Quarantined",transport="direct"} 1.0'
                in metrics
            )
    finally:
        await relay.stop(grace=5)


async def test_without_the_permission_it_says_so_once_and_mail_flows(
    tmp_path: Path, sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    """The reading app lacks ExchangeMessageTrace.Read.All: one warning, the gauge at 0, the doctor's
    row with the fix; mail is delivered as before and nothing is recorded as Microsoft's."""
    clock = sandbox.ctx.clock
    reader = {**submission(sandbox, graph_url=sandbox.graph_url), "name": "reader", "type": "graph",
              "client_id": MAIL_ONLY}  # fmt: skip
    config = write_config(tmp_path, **follow_sections(sandbox, app=reader))
    relay = started(config, sandbox)
    caplog.set_level(logging.INFO, logger="relay365.tracing")
    await relay.start()
    try:
        assert relay.follower is not None and relay.scheduler is not None
        for n in (4, 5):
            await submit(relay, "scanner@contoso.test", "alice@contoso.test", "Scan", n)
        await until(lambda: len(sandbox.ctx.store.list(mailbox="alice@contoso.test", folder="Inbox")) == 2)
        await relay.scheduler.drain()
        await relay.tracking.flush()
        clock.advance(120)
        for _ in range(3):
            await relay.follower.run_once()
            clock.advance(600)
        clock.advance(3600)  # past the recheck: asked again, refused again, not said again
        await relay.follower.run_once()
        rejections = sandbox.ctx.store.rejections()
        assert rejections == {"trace 403 Forbidden": 2}
        warnings = [r for r in caplog.records if "may not read Microsoft 365's message trace" in r.message]
        assert len(warnings) == 1 and "ExchangeMessageTrace.Read.All" in warnings[0].message
        gauge = relay.metrics.registry.get_sample_value("relay365_m365_trace_allowed", {"app": "reader"})
        assert gauge == 0
        clock.advance(2 * 86400)  # the horizon passes: the rows are given up, quietly (said once)
        await relay.follower.run_once()
        assert await relay.follower.store.next_due() is None
        await relay.tracking.flush()
        events = await trace_json(config, "--recipient", "alice@contoso.test")
        assert [e["kind"] for e in events if e["side"] == "microsoft"] == []
        assert sum(1 for e in events if e["kind"] == "delivered") == 2
    finally:
        await relay.stop(grace=5)
    rows = {r.name: r for r in await run_config_doctor(ConfigDoctorOptions(config=config, timeout_s=10))}
    row = rows["[reader] message trace (ExchangeMessageTrace.Read.All)"]
    assert row.status is Status.WARN and "403" in row.detail and "Grant admin consent" in row.fix


async def test_doctor_passes_when_the_app_may_read_the_trace(tmp_path: Path, sandbox: Sandbox) -> None:
    config = write_config(tmp_path, **follow_sections(sandbox))
    rows = {r.name: r for r in await run_config_doctor(ConfigDoctorOptions(config=config, timeout_s=10))}
    row = rows["[submission] message trace (ExchangeMessageTrace.Read.All)"]
    assert row.status is Status.PASS and "follows mail of direct, submission" in row.detail
    assert sandbox.ctx.store.rejections() == {}


async def test_relays_sharing_the_store_follow_each_recipient_once(tmp_path: Path, sandbox: Sandbox) -> None:
    """A second follower on the same files (another relay on the spool directory) and a third that
    died holding claims: one of them asks Microsoft at a time, every recipient gets Microsoft's status
    exactly once, and the dead one's rows are taken over when its lease runs out."""
    clock = sandbox.ctx.clock
    config = write_config(tmp_path, **follow_sections(sandbox))
    relay = started(config, sandbox)
    await relay.start()
    other = dead = None
    try:
        assert relay.follower is not None and relay.scheduler is not None
        ids = [
            await submit(relay, sender, "alice@contoso.test", f"Scan {n}", 10 + n)
            for n, sender in enumerate(["scanner@contoso.test", "scanner@fabrikam.test"] * 3)
        ]
        await until(lambda: len(sandbox.ctx.store.list(mailbox="alice@contoso.test")) == 6)
        await relay.scheduler.drain()
        await relay.tracking.flush()
        settings = load_settings(config)
        db = settings.server.spool_dir / "tracking.db"
        other = TraceFollower(
            settings=settings,
            tracking=relay.tracking,
            store=SqliteFollowStore(db),
            clock=clock.now,
            owner="B",
        )
        await other.store.open()
        dead = SqliteFollowStore(db)
        await dead.open()
        await relay.follower.run_once()  # taken in, not due yet
        clock.advance(120)
        held = await dead.claim(owner="C", now=clock.now(), lease=LEASE, limit=2)
        assert len(held) == 2
        reports = await asyncio.gather(relay.follower.run_once(), other.run_once())
        assert sum(r.settled for r in reports) == 4
        assert min(relay.follower.requests, other.requests) == 0  # one relay at a time asks Microsoft
        clock.advance(LEASE + 1)
        taken_over = await asyncio.gather(relay.follower.run_once(), other.run_once())
        assert sum(r.settled for r in taken_over) == 2
        await relay.tracking.flush()
        events = await trace_json(config, "--kind", "m365_status")
        assert sorted(e["queue_id"] for e in events) == sorted(ids)  # one status each, none twice
        assert sorted(e["reply"] for e in events) == ["Delivered"] * 3 + ["FilteredAsSpam"] * 3
    finally:
        if other is not None:
            await other.stop()
        if dead is not None:
            await dead.close()
        await relay.stop(grace=5)


async def test_queue_show_tells_microsofts_side_while_the_message_is_queued(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """One recipient reached Microsoft 365 (Direct Send), the other waits for a partner's server that
    is down: ``queue show`` has the queue state of both and Microsoft's status of the first."""
    clock = sandbox.ctx.clock
    sections = follow_sections(sandbox)
    down = {"name": "partner", "type": "smarthost", "host": "127.0.0.1", "port": closed_port(), "tls": "none"}
    sections["transport"].append(down)
    sections["route"].insert(
        0, {"name": "partners", "transport": "partner", "recipient_domains": ["example.org"]}
    )
    config = write_config(tmp_path, **sections)
    relay = started(config, sandbox)
    await relay.start()
    try:
        assert relay.follower is not None and relay.scheduler is not None

        def client() -> str:
            with smtplib.SMTP("127.0.0.1", relay.ports["lan"], timeout=10) as s:
                s.ehlo("printer.lan")
                s.mail("scanner@fabrikam.test")
                s.rcpt("alice@contoso.test")
                s.rcpt("buyer@example.org")
                code, reply = s.data(b"Subject: Order\r\nMessage-ID: <order-1@printer>\r\n\r\nx\r\n")
                assert code == 250
                return reply.decode().split()[-1]

        qid = await asyncio.to_thread(client)
        await until(lambda: len(sandbox.ctx.store.list(mailbox="alice@contoso.test")) == 1)
        await relay.scheduler.drain()
        await relay.tracking.flush()
        clock.advance(120)
        await relay.follower.run_once()
        await relay.tracking.flush()
        shown = await asyncio.to_thread(run_cli, "queue", "show", qid, "--json", "-c", str(config))
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        states = {r["rcpt"]: r["state"] for r in data["recipients"]}
        assert states == {"alice@contoso.test": "delivered", "buyer@example.org": "deferred"}
        [ms] = data["microsoft"]
        assert ms["recipient"] == "alice@contoso.test" and ms["status"] == "FilteredAsSpam"
        assert SPF_RECORD in ms["advice"]
        table = await asyncio.to_thread(run_cli, "queue", "show", qid, "-c", str(config))
        assert "inside Microsoft 365" in table.stdout and "FilteredAsSpam" in table.stdout
    finally:
        await relay.stop(grace=5)


async def test_graph_mail_is_followed_in_both_of_its_forms(tmp_path: Path, sandbox: Sandbox) -> None:
    """Graph sendMail with the device's MIME keeps its Message-ID; the JSON form (no Sent Items copy)
    gets a new one from Exchange, so that message is found by recipient, subject and time."""
    clock = sandbox.ctx.clock
    graph = {"type": "graph", "mailbox": "scanner@contoso.test", "ca_file": str(sandbox.ca_path),
             "graph_url": sandbox.graph_url, **oauth(sandbox)}  # fmt: skip
    config = write_config(
        tmp_path,
        transport=[{**graph, "name": "mime"}, {**graph, "name": "json", "save_to_sent_items": False}],
        route=[
            {"name": "fabrikam", "transport": "json", "recipient_domains": ["fabrikam.test"]},
            {"name": "contoso", "transport": "mime"},
        ],
        tracing={"poll_interval": 60},
    )
    relay = started(config, sandbox)
    await relay.start()
    try:
        assert relay.follower is not None and relay.scheduler is not None
        mime = await submit(relay, "scanner@contoso.test", "alice@contoso.test", "Scan A", 20)
        json_form = await submit(relay, "scanner@contoso.test", "bob@fabrikam.test", "Scan B", 21)
        store = sandbox.ctx.store
        await until(lambda: len(store.list(folder="Inbox")) == 2)
        ids = {m.mailbox: dict(m.headers).get("Message-ID") for m in store.list(folder="Inbox")}
        assert ids["alice@contoso.test"] == "<scan-20@printer.contoso.test>"
        assert ids["bob@fabrikam.test"] != "<scan-21@printer.contoso.test>"  # Exchange made a new one
        await relay.scheduler.drain()
        await relay.tracking.flush()
        clock.advance(120)
        report = await relay.follower.run_once()
        assert (report.asked, report.settled) == (2, 2)
        await relay.tracking.flush()
        events = await trace_json(config, "--kind", "m365_status")
        assert {e["queue_id"]: (e["reply"], e["transport"]) for e in events} == {
            mime: ("Delivered", "mime"),
            json_form: ("Delivered", "json"),
        }
    finally:
        await relay.stop(grace=5)


async def test_the_relays_follower_runs_by_itself(tmp_path: Path, sandbox: Sandbox) -> None:
    """No pass driven by the test: the follower the relay started looks every poll_interval."""
    config = write_config(tmp_path, **follow_sections(sandbox, poll_interval=1))
    relay = started(config, sandbox)
    await relay.start()
    try:
        qid = await submit(relay, "scanner@contoso.test", "alice@contoso.test", "Scan", 30)
        await until(lambda: len(sandbox.ctx.store.list(mailbox="alice@contoso.test")) == 1)
        sandbox.ctx.clock.advance(120)  # Microsoft's trace is read for periods that ended a minute ago

        async def recorded() -> list[TrackingEvent]:
            await relay.tracking.flush()
            return (
                await relay.tracking.search(TraceQuery(queue_id=qid, kinds=(EventKind.M365_STATUS,)))
            ).events

        deadline = asyncio.get_running_loop().time() + 30
        while not (found := await recorded()):
            assert asyncio.get_running_loop().time() < deadline, "the follower did not run"
            await asyncio.sleep(0.2)
        assert [e.reply for e in found] == ["Delivered"]
    finally:
        await relay.stop(grace=5)
