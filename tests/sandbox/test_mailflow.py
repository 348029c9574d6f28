"""After 250: SPF at the MX endpoint, Junk Email, quarantine, mail flow rules, and the trace record
each accepted message gets per recipient (issue 15, "The sandbox does what Exchange does here")."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import pytest
from typer.testing import CliRunner

from relay365.errors import ConfigError
from relay365.sandbox.cli import app as cli_app
from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import EXAMPLE_TENANT_PATH, InboundConnector, example_tenant, load_tenant
from relay365.sandbox.tenant_mailflow import MailFlowRule
from tests.sandbox.sandbox_helpers import (
    ALICE,
    BOB,
    EXTERNAL,
    SCANNER,
    app_token,
    client_tls,
    make_tenant,
    message,
    xoauth2,
)
from tests.sandbox.trace_helpers import direct_send, tls, trace_rows

pytestmark = pytest.mark.timeout(60)

OFFICE_IP = "203.0.113.5"  # the address in contoso.test's SPF record
OTHER_IP = "203.0.113.77"  # a NAT address that is not
SPF_WITHOUT_PEER = {
    "contoso.test": f"v=spf1 ip4:{OFFICE_IP} include:spf.protection.outlook.com ~all",
    "fabrikam.test": "v=spf1 ip4:198.51.100.99 -all",
    "neutral.test": "v=spf1 ?all",
}


def folder_of(sandbox: Sandbox, subject: str) -> list[tuple[str, str]]:
    return [(m.folder, m.mailbox) for m in sandbox.ctx.store.list() if m.subject == subject]


def stored_headers(sandbox: Sandbox, subject: str) -> Any:
    (stored,) = [m for m in sandbox.ctx.store.list() if m.subject == subject]
    return message_from_bytes(sandbox.ctx.store.content(stored.id), policy=policy.default)


def trace_of(sandbox: Sandbox, subject: str) -> list[dict[str, Any]]:
    return sorted(
        (r for r in trace_rows(sandbox) if r["subject"] == subject), key=lambda r: r["recipientAddress"]
    )


def details_of(sandbox: Sandbox, subject: str, recipient: str) -> list[dict[str, Any]]:
    now = sandbox.ctx.clock.now()
    (record,) = [r for r in sandbox.ctx.trace.records() if r.subject == subject and r.recipient == recipient]
    return record.details_to_graph(now)


async def test_direct_send_from_an_ip_outside_spf_lands_in_junk_then_inbox_once_spf_has_it(
    start_sandbox: Any,
) -> None:
    """The issue's scenario: 250, then Junk Email with Authentication-Results and SCL, FilteredAsSpam;
    after the SPF record includes the IP Microsoft sees, the next message is Delivered to the Inbox."""
    sandbox: Sandbox = await start_sandbox(spf_records=SPF_WITHOUT_PEER, public_ips={"127.0.0.1": OTHER_IP})
    reply = await direct_send(sandbox, SCANNER, [ALICE], message(SCANNER, ALICE, "Scan 1").as_bytes())
    assert reply.startswith("2.6.0 <") and reply.endswith("Queued mail for delivery")
    assert folder_of(sandbox, "Scan 1") == [("JunkEmail", ALICE)]
    junk = stored_headers(sandbox, "Scan 1")
    assert junk["Authentication-Results"] == (
        f"spf=softfail (sender IP is {OTHER_IP}) smtp.mailfrom=contoso.test; dkim=none (message not signed) "
        "header.d=none;dmarc=none action=none header.from=contoso.test;compauth=fail reason=601"
    )
    assert junk["X-MS-Exchange-Organization-SCL"] == "5"
    assert f"CIP:{OTHER_IP};" in junk["X-Forefront-Antispam-Report"]
    assert (
        "SFV:SPM;" in junk["X-Forefront-Antispam-Report"]
        and "CAT:SPOOF;SFTY:9.11;" in junk["X-Forefront-Antispam-Report"]
    )
    [row] = trace_of(sandbox, "Scan 1")
    assert (row["status"], row["fromIP"], row["senderAddress"], row["recipientAddress"]) == (
        "filteredAsSpam",
        OTHER_IP,
        SCANNER,
        ALICE,
    )
    assert row["messageId"] == junk["Message-ID"] and reply.split()[1] == junk["Message-ID"]
    events = details_of(sandbox, "Scan 1", ALICE)
    assert [e["event"] for e in events] == ["Receive", "Spam Diagnostics", "Deliver"]
    assert (
        f'Name="CIP" String="{OTHER_IP}"' in events[1]["data"]
        and 'Name="SPF" String="softfail"' in events[1]["data"]
    )
    assert events[2]["description"] == "The message was delivered to the Junk Email folder."

    fixed = dict(SPF_WITHOUT_PEER, **{"contoso.test": f"v=spf1 ip4:{OFFICE_IP} ip4:{OTHER_IP} ~all"})
    sandbox.ctx.tenant = dataclasses.replace(sandbox.ctx.tenant, spf_records=fixed)
    await direct_send(sandbox, SCANNER, [ALICE], message(SCANNER, ALICE, "Scan 2").as_bytes())
    assert folder_of(sandbox, "Scan 2") == [("Inbox", ALICE)]
    inbox = stored_headers(sandbox, "Scan 2")
    assert inbox["Authentication-Results"].startswith(
        f"spf=pass (sender IP is {OTHER_IP}) smtp.mailfrom=contoso.test;"
    )
    assert inbox["Authentication-Results"].endswith("compauth=pass reason=100")
    assert inbox["X-MS-Exchange-Organization-SCL"] == "1"
    assert [r["status"] for r in trace_of(sandbox, "Scan 2")] == ["delivered"]
    assert sandbox.ctx.store.rejections() == {}  # Microsoft said 250 both times


@pytest.mark.parametrize(
    ("sender", "spf", "auth", "folder"),
    [
        ("app@fabrikam.test", "fail", "compauth=fail reason=601", "JunkEmail"),  # -all
        ("app@neutral.test", "neutral", "compauth=fail reason=001", "JunkEmail"),  # ?all, not ours
        ("app@unpublished.test", "none", "compauth=fail reason=001", "JunkEmail"),  # no record
        ("scanner@contoso.test", "pass", "compauth=pass reason=100", "Inbox"),
        ("", "none", "compauth=fail reason=001", "JunkEmail"),  # <>: the HELO name is checked
    ],
    ids=["hardfail", "neutral", "none", "pass", "null-sender"],
)
async def test_spf_results_and_composite_authentication(
    start_sandbox: Any, sender: str, spf: str, auth: str, folder: str
) -> None:
    sandbox: Sandbox = await start_sandbox(spf_records=SPF_WITHOUT_PEER, public_ips={"127.0.0.1": OFFICE_IP})
    author = sender or "printer@example.org"
    await direct_send(sandbox, sender, [ALICE], message(author, ALICE, "Checked").as_bytes())
    assert folder_of(sandbox, "Checked") == [(folder, ALICE)]
    results = stored_headers(sandbox, "Checked")["Authentication-Results"]
    assert results.startswith(f"spf={spf} (sender IP is {OFFICE_IP}) smtp.mailfrom=")
    assert results.endswith(auth)


async def test_spoof_intelligence_off_and_quarantine_action(start_sandbox: Any) -> None:
    """The anti-phishing policy decides: spoof intelligence off delivers, AuthenticationFailAction
    Quarantine (the Strict preset) quarantines instead of Junk."""
    relaxed: Sandbox = await start_sandbox(spf_records=SPF_WITHOUT_PEER, spoof_intelligence=False)
    await direct_send(relaxed, SCANNER, [ALICE], message(SCANNER, ALICE, "Relaxed").as_bytes())
    assert folder_of(relaxed, "Relaxed") == [("Inbox", ALICE)]
    assert stored_headers(relaxed, "Relaxed")["Authentication-Results"].endswith("compauth=fail reason=601")
    strict: Sandbox = await start_sandbox(spf_records=SPF_WITHOUT_PEER, spoof_action="quarantine")
    await direct_send(strict, SCANNER, [ALICE, BOB], message(SCANNER, ALICE, "Strict").as_bytes())
    assert sorted(folder_of(strict, "Strict")) == [("Quarantine", ALICE), ("Quarantine", BOB)]
    assert [r["status"] for r in trace_of(strict, "Strict")] == ["quarantined", "quarantined"]


async def test_connector_mail_is_not_judged_for_spoofing(start_sandbox: Any) -> None:
    """Mail attributed to an inbound connector (here by the IP Microsoft sees) gets SPF stamped but no
    composite authentication verdict (compauth=none): Inbox, and relayed outside the tenant."""
    connector = InboundConnector(name="office", sender_ip_ranges=(ipaddress.ip_network(f"{OTHER_IP}/32"),))
    sandbox: Sandbox = await start_sandbox(
        spf_records=SPF_WITHOUT_PEER, public_ips={"127.0.0.1": OTHER_IP}, connectors=(connector,)
    )
    await direct_send(sandbox, SCANNER, [ALICE, EXTERNAL], message(SCANNER, ALICE, "Relayed").as_bytes())
    assert sorted(folder_of(sandbox, "Relayed")) == [("Inbox", ALICE), ("Internet", EXTERNAL)]
    results = stored_headers_for(sandbox, "Relayed", ALICE)["Authentication-Results"]
    assert results.startswith(f"spf=softfail (sender IP is {OTHER_IP})") and results.endswith(
        "compauth=none reason=405"
    )
    rows = trace_of(sandbox, "Relayed")
    assert [(r["recipientAddress"], r["status"]) for r in rows] == [
        (ALICE, "delivered"),
        (EXTERNAL, "delivered"),
    ]
    assert [e["event"] for e in details_of(sandbox, "Relayed", EXTERNAL)] == ["Receive", "Send external"]
    assert "connector office" in details_of(sandbox, "Relayed", ALICE)[0]["description"]


def stored_headers_for(sandbox: Sandbox, subject: str, mailbox: str) -> Any:
    (stored,) = [m for m in sandbox.ctx.store.list(mailbox=mailbox) if m.subject == subject]
    return message_from_bytes(sandbox.ctx.store.content(stored.id), policy=policy.default)


async def test_mail_flow_rules_quarantine_redirect_and_reject(start_sandbox: Any) -> None:
    rules = (
        MailFlowRule(name="Hold invoices", action="quarantine", subject_contains=("invoice",)),
        MailFlowRule(name="To the boss", action="redirect", senders=("@fabrikam.test",), redirect_to=ALICE),
        MailFlowRule(name="No spam", action="reject", subject_contains=("casino",)),
    )
    sandbox: Sandbox = await start_sandbox(rules=rules)
    await direct_send(sandbox, SCANNER, [ALICE, BOB], message(SCANNER, ALICE, "Your INVOICE 42").as_bytes())
    await direct_send(sandbox, BOB, ["noreply@contoso.test"], message(BOB, SCANNER, "Weekly").as_bytes())
    await direct_send(sandbox, SCANNER, [ALICE], message(SCANNER, ALICE, "casino night").as_bytes())
    await direct_send(sandbox, "", [ALICE], message("daemon@contoso.test", ALICE, "casino bounce").as_bytes())

    assert sorted(folder_of(sandbox, "Your INVOICE 42")) == [("Quarantine", ALICE), ("Quarantine", BOB)]
    assert [r["status"] for r in trace_of(sandbox, "Your INVOICE 42")] == ["quarantined", "quarantined"]
    events = details_of(sandbox, "Your INVOICE 42", ALICE)
    assert [(e["event"], e["action"]) for e in events] == [
        ("Receive", ""),
        ("Transport rule", "Quarantine"),
        ("Quarantine", ""),
    ]
    assert "security.microsoft.com/quarantine" in events[2]["description"]

    assert folder_of(sandbox, "Weekly") == [("Inbox", ALICE)]
    rows = trace_of(sandbox, "Weekly")
    assert [(r["recipientAddress"], r["status"]) for r in rows] == [
        (ALICE, "delivered"),
        ("noreply@contoso.test", "expanded"),
    ]
    redirect = details_of(sandbox, "Weekly", "noreply@contoso.test")[-1]
    assert redirect["event"] == "Redirect" and ALICE in redirect["description"]

    assert folder_of(sandbox, "casino night") == []
    assert [r["status"] for r in trace_of(sandbox, "casino night")] == ["failed"]
    assert details_of(sandbox, "casino night", ALICE)[-1]["description"] == (
        "Reason: [{LED=550 5.7.1 Delivery not authorized, message refused}]"
    )
    (ndr,) = [m for m in sandbox.ctx.store.list(mailbox=SCANNER) if m.subject.startswith("Undeliverable")]
    assert ndr.folder == "Inbox" and ndr.mail_from == ""
    assert b"550 5.7.1 Delivery not authorized, message refused" in sandbox.ctx.store.content(ndr.id)
    # The null sender never gets a bounce (RFC 3464 / RFC 5321 4.5.5).
    assert [r["status"] for r in trace_of(sandbox, "casino bounce")] == ["failed"]
    assert [m for m in sandbox.ctx.store.list() if "casino bounce" in m.subject] == []


async def test_submission_traces_each_recipient_and_defers_over_the_minute_rate(start_sandbox: Any) -> None:
    """SMTP AUTH: one record per recipient (Inbox and outside), Sent Items untouched by the trace;
    over 30 messages a minute a message is Pending until the following minute, then Delivered."""
    sandbox: Sandbox = await start_sandbox(limits={"messages_per_minute": 1})
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sandbox.submission_port, start_tls=False, timeout=10)
    await client.connect()
    await client.starttls(tls_context=client_tls(sandbox))
    await client.ehlo()
    await client.execute_command(b"AUTH", b"XOAUTH2", xoauth2(SCANNER, app_token(sandbox)).encode())
    await client.sendmail(SCANNER, [ALICE, EXTERNAL], message(SCANNER, ALICE, "First").as_bytes())
    await client.sendmail(SCANNER, [ALICE], message(SCANNER, ALICE, "Second").as_bytes())
    await client.quit()
    first = trace_of(sandbox, "First")
    assert [(r["recipientAddress"], r["status"], r["fromIP"]) for r in first] == [
        (ALICE, "delivered", "127.0.0.1"),
        (EXTERNAL, "delivered", "127.0.0.1"),
    ]
    sent = [m for m in sandbox.ctx.store.list(folder="SentItems") if m.subject == "First"]
    assert first[0]["id"] == first[1]["id"] and first[0]["size"] == sent[0].size
    assert [r["status"] for r in trace_of(sandbox, "Second")] == ["pending"]
    assert [e["event"] for e in details_of(sandbox, "Second", ALICE)] == ["Receive", "Defer"]
    sandbox.ctx.clock.advance(61)
    assert [r["status"] for r in trace_of(sandbox, "Second")] == ["delivered"]
    assert [e["event"] for e in details_of(sandbox, "Second", ALICE)] == ["Receive", "Defer", "Deliver"]
    assert len(sandbox.ctx.store.list(folder="SentItems")) == 2  # as before: one copy per message


async def test_trace_records_wait_in_getting_status(start_sandbox: Any) -> None:
    sandbox: Sandbox = await start_sandbox(limits={"trace_status_delay_seconds": 600})
    await direct_send(sandbox, SCANNER, [ALICE], message(SCANNER, ALICE, "Slow").as_bytes())
    assert [r["status"] for r in trace_of(sandbox, "Slow")] == ["gettingStatus"]
    assert [e["event"] for e in details_of(sandbox, "Slow", ALICE)] == ["Receive"]
    sandbox.ctx.clock.advance(600)
    assert [r["status"] for r in trace_of(sandbox, "Slow")] == ["delivered"]


async def test_trace_survives_a_restart(tmp_path: Path) -> None:
    async with Sandbox(make_tenant(), state_dir=tmp_path, serve_http=False) as first:
        await direct_send(first, SCANNER, [ALICE, BOB], message(SCANNER, ALICE, "Kept").as_bytes())
        before = trace_rows(first)
    with (tmp_path / "trace" / "records.jsonl").open("ab") as log:
        log.write(b'{"torn": ')  # a crash in the middle of a line
    async with Sandbox(make_tenant(), state_dir=tmp_path, serve_http=False) as second:
        assert sorted(trace_rows(second), key=str) == sorted(before, key=str)


async def test_mail_list_and_admin_api_show_junk_email_and_quarantine(tmp_path: Path) -> None:
    rules = (MailFlowRule(name="hold", action="quarantine", subject_contains=("hold",)),)
    tenant = make_tenant(spf_records=SPF_WITHOUT_PEER, rules=rules)
    async with Sandbox(tenant, state_dir=tmp_path, serve_http=True) as sandbox:
        await direct_send(sandbox, SCANNER, [ALICE], message(SCANNER, ALICE, "Spoofed").as_bytes())
        await direct_send(sandbox, BOB, [ALICE], message(BOB, ALICE, "Please hold").as_bytes())
        async with httpx.AsyncClient(verify=tls(sandbox), timeout=10) as http:
            held = {}
            for folder, subject in (("JunkEmail", "Spoofed"), ("Quarantine", "Please hold")):
                listed = await http.get(f"{sandbox.base_url}/_sandbox/messages", params={"folder": folder})
                assert [m["subject"] for m in listed.json()["messages"]] == [subject]
                held[folder] = listed.json()["messages"][0]["id"]
            # An admin releases the quarantined copy (Microsoft: the Defender portal's quarantine page).
            quarantine = f"{sandbox.base_url}/_sandbox/quarantine"
            released = await http.post(f"{quarantine}/{held['Quarantine']}/release")
            assert released.status_code == 200 and released.json()["message"]["folder"] == "Inbox"
            assert (await http.post(f"{quarantine}/{held['Quarantine']}/release")).status_code == 409
            assert (await http.post(f"{quarantine}/{held['JunkEmail']}/release")).status_code == 409
            assert (await http.post(f"{quarantine}/nonexistent/release")).status_code == 404
        assert [r["status"] for r in trace_of(sandbox, "Please hold")] == ["delivered"]
        assert [e["event"] for e in details_of(sandbox, "Please hold", ALICE)][-2:] == [
            "Quarantine",
            "Release",
        ]
        assert folder_of(sandbox, "Please hold") == [("Inbox", ALICE)]
        await direct_send(sandbox, BOB, [ALICE], message(BOB, ALICE, "Hold again").as_bytes())
    runner = CliRunner()
    junk = runner.invoke(
        cli_app, ["mail", "list", "--state-dir", str(tmp_path), "--folder", "JunkEmail", "--json"]
    )
    assert [(m["folder"], m["mailbox"], m["subject"]) for m in json.loads(junk.output)] == [
        ("JunkEmail", ALICE, "Spoofed")
    ]
    table = runner.invoke(cli_app, ["mail", "list", "--state-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert (
        table.exit_code == 0 and "JunkEmail" in table.output and "Quarantine" in table.output
    )  # "Hold again"
    shown = runner.invoke(
        cli_app, ["mail", "show", json.loads(junk.output)[0]["id"], "--state-dir", str(tmp_path)]
    )
    assert "X-MS-Exchange-Organization-SCL: 5" in shown.output and "compauth=fail reason=601" in shown.output


@pytest.mark.parametrize(
    ("replace", "bad", "key", "value"),
    [
        (
            '"fabrikam.test" = "v=spf1',
            '"fabrikam.test" = "spf1',
            "spf.fabrikam.test",
            "spf1 include:spf.protection.outlook.com -all",
        ),
        ('"127.0.0.1" = "203.0.113.5"', '"127.0.0.1" = "office"', "public_ip.127.0.0.1", "office"),
        ('action = "quarantine"', 'action = "delete"', "rule[0].action", "delete"),
        ('action = "quarantine"', 'action = "redirect"', "rule[0].redirect_to", None),
        (
            'action = "quarantine"',
            'action = "redirect"\nredirect_to = "ghost@contoso.test"',
            "rule[0].redirect_to",
            "ghost@contoso.test",
        ),
        (
            'subject_contains = ["[quarantine-test]"]',
            "subject_contains = []",
            "rule[0].name",
            "Quarantine suspicious invoices",
        ),
        ('spoof_action = "junk"', 'spoof_action = "delete"', "spoof_action", "delete"),
        ("trace_window_seconds = 300", "trace_window_seconds = 0", "limits.trace_window_seconds", 0),
    ],
    ids=[
        "spf",
        "public-ip",
        "action",
        "redirect-without-target",
        "redirect-unknown",
        "no-condition",
        "spoof",
        "window",
    ],
)
def test_tenant_mail_flow_errors_name_the_key_and_the_value(
    tmp_path: Path, replace: str, bad: str, key: str, value: object
) -> None:
    text = EXAMPLE_TENANT_PATH.read_text()
    assert replace in text
    path = tmp_path / "tenant.toml"
    path.write_text(text.replace(replace, bad, 1))
    with pytest.raises(ConfigError) as error:
        load_tenant(path)
    assert (error.value.key, error.value.value) == (key, value)


def test_the_example_tenant_documents_mail_flow() -> None:
    tenant = example_tenant()
    assert tenant.public_ip("127.0.0.1") == "203.0.113.5" and tenant.public_ip("::1") == "203.0.113.5"
    assert tenant.public_ip("192.0.2.1") == "192.0.2.1"
    assert tenant.spf_records["contoso.test"].startswith("v=spf1 ip4:203.0.113.5 ")
    assert tenant.spoof_intelligence and tenant.spoof_action == "junk"
    assert [(r.name, r.action) for r in tenant.rules] == [("Quarantine suspicious invoices", "quarantine")]
    assert (tenant.limits.trace_requests_per_window, tenant.limits.trace_window_seconds) == (100, 300)
    relay_app = tenant.apps["11111111-2222-3333-4444-555555555555"]
    assert "ExchangeMessageTrace.Read.All" in relay_app.permissions


async def test_a_helo_name_with_a_bare_cr_cannot_add_a_header_field(start_sandbox: Any) -> None:
    sandbox: Sandbox = await start_sandbox()
    reader, writer = await asyncio.open_connection("127.0.0.1", sandbox.mx_port)
    try:
        await reader.readline()
        body = message(SCANNER, ALICE, "Injected?").as_bytes().replace(b"\n", b"\r\n")
        writer.write(b"EHLO evil\rX-Injected: 1\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        for command in (f"MAIL FROM:<{SCANNER}>", f"RCPT TO:<{ALICE}>", "DATA"):
            writer.write(command.encode() + b"\r\n")
            await reader.readline()
        writer.write(body + b".\r\n")
        assert (await reader.readline()).startswith(b"250 ")
    finally:
        writer.close()
        await writer.wait_closed()
    stamped = stored_headers(sandbox, "Injected?")
    assert stamped["X-Injected"] is None
    assert "H:evilX-Injected: 1;" in stamped["X-Forefront-Antispam-Report"]
