"""The follower's pure parts: [tracing] settings, which app reads whose trace, what one answer changes
for a row, the advice table, matching mail without a Message-ID, and one timeline of both halves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relay365.errors import ConfigError
from relay365.observability.tracking import EventKind, TrackingEvent
from relay365.settings import parse_settings
from relay365.tracing.apps import follow_plan
from relay365.tracing.decide import Found, later, settle
from relay365.tracing.explain import advise, event_dict, load_advice, microsoft_half, reason, timeline
from relay365.tracing.lookup import match_without_id
from relay365.tracing.model import TraceDetail, TraceRecord, TraceStatus
from relay365.tracing.work import FollowItem

T0 = 1_800_000_000.0
OAUTH = {"tenant": "contoso.onmicrosoft.com", "client_id": "app-1", "client_secret_env": "X_SECRET"}


def settings(tmp_path: Path, *transports: dict[str, Any], **tracing: Any) -> Any:
    data: dict[str, Any] = {"server": {"spool_dir": str(tmp_path)}, "transport": list(transports)}
    if tracing:
        data["tracing"] = tracing
    return parse_settings(data, base=tmp_path)


DIRECT = {"name": "direct", "type": "direct_send", "accepted_domains": ["contoso.com"]}
SUBMISSION = {"name": "sub", "type": "submission", "mailbox": "scanner@contoso.com", **OAUTH}
GRAPH = {"name": "graph", "type": "graph", "mailbox": "scanner@contoso.com", **OAUTH}


def test_tracing_settings_are_checked_by_name(tmp_path: Path) -> None:
    s = settings(tmp_path, DIRECT, SUBMISSION)
    assert (s.tracing.enabled, s.tracing.horizon, s.tracing.poll_interval) == (True, 172800.0, 300.0)
    with pytest.raises(ConfigError, match=r"'tracing.app' has value 'direct'.*app-only credentials"):
        settings(tmp_path, DIRECT, SUBMISSION, app="direct")
    with pytest.raises(ConfigError, match=r"'tracing.app' has value 'nope'. No transport"):
        settings(tmp_path, DIRECT, app="nope")
    with pytest.raises(ConfigError, match=r"'tracing.horizon' has value 100.0.*600 seconds to 90 days"):
        settings(tmp_path, DIRECT, horizon=100)
    with pytest.raises(ConfigError, match=r"'tracing.transports' has value 'x'"):
        settings(tmp_path, DIRECT, transports=["x"])
    with pytest.raises(ConfigError, match=r"'tracing.every' has value 1. Unknown key"):
        settings(tmp_path, DIRECT, every=1)


def test_which_app_reads_whose_trace(tmp_path: Path) -> None:
    plan = follow_plan(settings(tmp_path, DIRECT, SUBMISSION, GRAPH))
    # One tenant: one app (the graph transport's) for everything, Direct Send included.
    assert plan.transports == {"direct": "graph", "sub": "graph", "graph": "graph"} and list(plan.apps) == [
        "graph"
    ]
    alone = follow_plan(settings(tmp_path, DIRECT))
    assert alone.transports == {} and "[tracing] app" in alone.skipped["direct"]
    other = {**GRAPH, "name": "fabrikam", "tenant": "fabrikam.onmicrosoft.com"}
    two = follow_plan(settings(tmp_path, DIRECT, SUBMISSION, other))
    assert "direct" in two.skipped and two.transports == {"sub": "sub", "fabrikam": "fabrikam"}
    chosen = follow_plan(settings(tmp_path, DIRECT, SUBMISSION, other, app="sub"))
    assert chosen.transports["direct"] == "sub"
    sandboxed = {**SUBMISSION, "authority": "https://127.0.0.1:8443"}  # and no graph_url for it
    assert "graph_url" in follow_plan(settings(tmp_path, DIRECT, sandboxed)).skipped["sub"]
    assert follow_plan(settings(tmp_path, DIRECT, SUBMISSION, enabled=False)).transports == {}


def row(**changes: Any) -> FollowItem:
    base = FollowItem(
        queue_id="Q1", recipient="alice@contoso.com", message_id="m1@x", sender="scan@fabrikam.com",
        subject="Scan", device="mfp", transport="direct", route="scans", sent_at=T0, due=T0 + 300,
    )  # fmt: skip
    return base.but(**changes)


def record(status: TraceStatus, **changes: Any) -> TraceRecord:
    values: dict[str, Any] = {
        "trace_id": "t-1", "message_id": "<m1@x>", "sender": "scan@fabrikam.com",
        "recipient": "alice@contoso.com", "received_at": T0 + 1, "subject": "Scan", "size": 10,
        "from_ip": "203.0.113.5", "to_ip": "", "status": status, **changes,
    }  # fmt: skip
    return TraceRecord(**values)


SPAM_EVENTS = (
    TraceDetail(T0 + 1, "Receive", "", "Message received", ""),
    TraceDetail(T0 + 2, "Spam Diagnostics", "", "Spoof: composite authentication failed.",
                '<root><MEP Name="CIP" String="203.0.113.5" /><MEP Name="SPF" String="fail" /></root>'),
    TraceDetail(T0 + 2, "Deliver", "MoveToJmf", "The message was delivered to the Junk Email folder.", ""),
)  # fmt: skip


def test_one_answer_for_one_row() -> None:
    absent = settle(row(), Found(None), now=T0 + 300, poll=300, horizon=7200)
    assert (absent.item.due, absent.item.checks, absent.events) == (T0 + 600, 1, [])
    waiting = settle(row(), Found(record(TraceStatus.GETTING_STATUS)), now=T0 + 300, poll=300, horizon=7200)
    assert waiting.events == [] and waiting.item.trace_id == "t-1" and not waiting.item.done
    pending = settle(row(), Found(record(TraceStatus.PENDING)), now=T0 + 300, poll=300, horizon=7200)
    assert [e.reply for e in pending.events] == ["Pending"]  # said once ...
    again = settle(pending.item, Found(record(TraceStatus.PENDING)), now=T0 + 600, poll=300, horizon=7200)
    assert again.events == []  # ... not at every look
    spam = record(TraceStatus.FILTERED_AS_SPAM)
    unread = settle(row(), Found(spam), now=T0 + 300, poll=300, horizon=7200)  # events not read this pass
    assert (
        unread.item.details_due
        and unread.item.due == T0 + 300
        and unread.events == []
        and not unread.item.done
    )
    final = settle(
        unread.item, Found(spam, SPAM_EVENTS, details_read=True), now=T0 + 310, poll=300, horizon=7200
    )
    assert final.item.done and final.outcome == "FilteredAsSpam"
    assert [(e.kind, e.reply) for e in final.events] == [
        (EventKind.M365_EVENT, "Receive"), (EventKind.M365_EVENT, "Spam Diagnostics"),
        (EventKind.M365_EVENT, "Deliver"), (EventKind.M365_STATUS, "FilteredAsSpam"),
    ]  # fmt: skip
    status = final.events[-1]
    assert status.at == T0 + 2 and status.peer == "203.0.113.5" and "SPF=fail" in status.detail
    delivered = settle(row(), Found(record(TraceStatus.DELIVERED)), now=T0 + 300, poll=300, horizon=7200)
    assert delivered.item.done and [e.reply for e in delivered.events] == ["Delivered"]  # no events needed
    gone = settle(row(status="pending"), Found(None), now=T0 + 7200, poll=300, horizon=7200)
    assert gone.unresolved and gone.item.done and gone.item.status == "unresolved"
    assert gone.events[0].kind is EventKind.M365_UNRESOLVED and gone.events[0].reply == "Pending"
    assert "within 2 h" in gone.events[0].detail
    # Not asked this pass: again later, and past the horizon given up (quietly without the permission).
    assert later(row(), due=T0 + 900, now=T0 + 600, horizon=7200, why="x", quiet=False).item.due == T0 + 900
    silent = later(row(), due=T0 + 9000, now=T0 + 7200, horizon=7200, why="no permission", quiet=True)
    assert silent.item.done and silent.events == [] and not silent.unresolved
    said = later(row(), due=T0 + 9000, now=T0 + 7200, horizon=7200, why="trace down (503)", quiet=False)
    assert said.unresolved and "trace down (503) within 2 h" in said.events[0].detail


def test_advice_names_the_record_to_publish_and_where_to_release() -> None:
    why = reason(SPAM_EVENTS)
    assert why.startswith("Spam Diagnostics: Spoof") and "Receive" not in why and "(action MoveToJmf)" in why
    spf = advise("FilteredAsSpam", why, ip="203.0.113.5", sender="scan@fabrikam.com")
    assert spf is not None and '"v=spf1 ip4:203.0.113.5 include:spf.protection.outlook.com ~all"' in spf.text
    assert "relay365 spf --domain fabrikam.com --ip 203.0.113.5" in spf.text
    v6 = advise("filteredAsSpam", why, ip="2001:db8::5", sender="scan@fabrikam.com")
    assert v6 is not None and "ip6:2001:db8::5" in v6.text
    plain = advise("FilteredAsSpam", "Spam Diagnostics: bulk mail", ip="203.0.113.5", sender="a@b.c")
    assert plain is not None and "X-Forefront-Antispam-Report" in plain.text
    rule = advise("Quarantined", "Transport rule: Transport rule 'X' was applied: quarantine.")
    assert (
        rule is not None and "https://security.microsoft.com/quarantine" in rule.text and "rule" in rule.text
    )
    failed = advise("Failed", "Fail: Reason: [{LED=550 5.7.60 SMTP; Client does not have permissions}]")
    assert failed is not None and "Send As" in failed.text  # the reply catalogue's entry for 5.7.60
    assert advise("Delivered", "") is None and advise("gettingStatus", "") is None
    with pytest.raises(ConfigError, match="Needs a known status"):
        load_advice('[[advice]]\nstatus = "lost"\ntext = "x"\nsource = "y"\n')


def test_a_message_without_message_id_is_matched_by_subject_and_time() -> None:
    items = [
        row(queue_id="Q1", message_id="", sent_at=T0),
        row(queue_id="Q2", message_id="", sent_at=T0 + 60),
    ]
    found = [
        record(TraceStatus.DELIVERED, trace_id="late", received_at=T0 + 61, message_id="<x@eop>"),
        record(TraceStatus.DELIVERED, trace_id="early", received_at=T0 + 1, message_id="<y@eop>"),
        record(TraceStatus.DELIVERED, trace_id="other", received_at=T0 + 2, subject="Invoice"),
        record(TraceStatus.DELIVERED, trace_id="far", received_at=T0 - 3600),
    ]
    matched = match_without_id(items, found)
    assert {k[0]: r.trace_id for k, r in matched.items()} == {"Q1": "early", "Q2": "late"}


def test_both_halves_in_one_timeline() -> None:
    def ev(kind: EventKind, at: float, n: int, reply: str = "", detail: str = "") -> TrackingEvent:
        return TrackingEvent(
            kind=kind, at=at, id=n, queue_id="Q1", recipient="alice@contoso.com",
            sender="scan@fabrikam.com", peer="203.0.113.5", reply=reply, detail=detail,
        )  # fmt: skip

    events = [
        ev(EventKind.M365_STATUS, T0 + 2, 9, "FilteredAsSpam", reason(SPAM_EVENTS)),
        ev(EventKind.M365_EVENT, T0, 7, "Receive"),  # Microsoft: whole seconds, written later
        ev(EventKind.DELIVERED, T0 + 0.4, 3, "250 2.6.0 queued"),
        ev(EventKind.RECEIVED, T0 - 5, 1),
    ]
    kinds = [e.kind.value for e in timeline(events)]
    assert kinds == ["received", "delivered", "m365_event", "m365_status"]
    [half] = microsoft_half(events)
    assert half["status"] == "FilteredAsSpam" and "ip4:203.0.113.5" in half["advice"]
    assert [e["event"] for e in half["events"]] == ["Receive"]
    data = event_dict(events[0])
    assert data["side"] == "microsoft" and data["advice_source"].startswith("https://learn.microsoft.com/")
    assert event_dict(events[2])["side"] == "relay" and event_dict(events[2])["advice"] is None
