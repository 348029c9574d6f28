"""The reply-code catalogue against real reply strings seen from Exchange Online."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay365.diagnostics.catalogue import Category, classify, entries, is_transient, parse_reply, summary

DOCS = Path("/work/shared/docs/exchange-online.md")

# (reply as seen in the wild / in Microsoft's docs, expected catalogue code, expected transient)
REAL_REPLIES = [
    ("550 5.7.30 Basic authentication is not supported for Client Submission.", "5.7.30", True),
    ("535 5.7.3 Authentication unsuccessful [BN0PR04CA0123.namprd04.prod.outlook.com]", "5.7.3", True),
    (
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. "
        "Visit https://aka.ms/smtp_auth_disabled for more information.",
        "5.7.139",
        True,
    ),
    (
        "530 5.7.57 Client not authenticated to send mail. [AM0PR02CA0001.eurprd02.prod.outlook.com]",
        "5.7.57",
        True,
    ),
    ("550 5.7.60 SMTP; Client does not have permissions to send as this sender", "5.7.60", False),
    ("Remote Server returned '550 5.7.64 TenantAttribution; Relay Access Denied'", "5.7.64", False),
    (
        "550 5.7.68 TenantInboundAttribution; Direct Send not allowed for this organization from "
        "unauthorized sources",
        "5.7.68",
        False,
    ),
    ("550 5.7.606 Access denied, banned sending IP [203.0.113.5]", "5.7.606-649", False),
    ("550 5.7.649 Access denied, banned sending IP [198.51.100.7]", "5.7.606-649", False),
    ("550 5.7.705 Access denied, tenant has exceeded threshold", "5.7.705", False),
    ("550 5.7.708 Access denied, traffic not accepted from this IP", "5.7.708", False),
    ("550 5.7.720 Access denied, tenant has exceeded threshold", "5.7.700-749", False),
    (
        "550 5.7.750 Service unavailable. Client blocked from sending from unregistered domains",
        "5.7.750",
        False,
    ),
    ("451 4.7.500 Access denied, please try again later.", "4.7.500-699", True),
    ("451 4.7.650 Access denied, please try again later.", "4.7.500-699", True),
    (
        "432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending",
        "4.3.2",
        True,
    ),
    ("#550 5.4.1 Recipient address rejected: Access denied. AS(201806281) ##", "5.4.1", False),
    ("Remote Server returned '550 5.1.1 RESOLVER.ADR.RecipNotFound; not found'", "5.1.1", False),
    (
        "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        "5.1.10",
        False,
    ),
    ("552 5.3.4 Message size exceeds fixed maximum message size", "5.3.4", False),
    ("550 5.7.1 Unable to relay", "5.7.1", False),
    ("550 5.7.23 The message was rejected because of Sender Policy Framework violation", "5.7.23", False),
    ("Remote Server returned '550 5.1.8 Access denied, bad outbound sender.'", "5.1.8", False),
    ("550 5.2.121 Recipient's per hour message receive limit from specific sender exceeded", "5.2.121", True),
    ("550 5.2.122 Recipient's per hour message receive limit exceeded", "5.2.122", True),
    ("550 5.4.316 Message expired, connection refused(Socket error code 10061)", "5.4.316", False),
    ("4.4.7 Message expired", "4.4.7", True),
    ("550 5.7.124 Sender not in allowed-senders list", "5.7.124", False),
    ("550 5.7.133 RESOLVER.RST.SenderNotAuthenticatedForGroup; authentication required", "5.7.133", False),
    (
        "550 5.7.509 Access denied, sending domain example.com does not pass DMARC verification",
        "5.7.509",
        False,
    ),
    ("550 5.7.510 Access denied, example.com does not accept email over IPv6", "5.7.510", False),
    ("550 5.1.90 Your message can't be sent because you've reached your daily limit", "5.1.90", True),
    ("452 4.5.3 Too many recipients", "4.5.3", True),
    ("451 4.7.860 Access denied, please try again later", "4.7.850-899", True),
    (
        "550 5.7.322 certificate-expired: Destination mail server's certificate is expired.",
        "5.7.321-325",
        False,
    ),
    ("550 5.2.2 Submission quota exceeded", "5.2.2", True),
    ("552 5.2.2 Mailbox full", "5.2.2", False),
    ("550 5.7.233 Your message can't be sent because your tenant exceeded its daily limit", "5.7.233", True),
    (
        "550 5.7.513 Service unavailable, Client host [203.0.113.5] blocked by contoso.com using "
        "Customer Block list (AS16012607)",
        "5.7.513",
        False,
    ),
    (
        "550 5.7.515 Access denied, sending domain contoso.com does not meet the required "
        "authentication level.",
        "5.7.515",
        False,
    ),
    (
        "550 5.7.703 Your message can't be delivered because one or more recipients are blocked",
        "5.7.703",
        False,
    ),
    ("Remote Server returned '550 5.4.1 Relay Access Denied ATTR35'", "5.4.1", False),
    (
        "mail.contoso.com #<exchange.contoso.com #5.7.1 smtp;530 5.7.1 Client was not authenticated> #SMTP#",
        "5.7.1",
        True,
    ),
    ("550 5.0.350 Requested action not taken: policy violation detected (AS345)", "5.0.350", False),
    (
        "421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to support TLS 1.2.",
        "4.7.66",
        True,
    ),
]


@pytest.mark.parametrize(("reply", "code", "transient"), REAL_REPLIES)
def test_real_replies(reply: str, code: str, transient: bool) -> None:
    entry = classify(reply)
    assert entry is not None
    assert entry.code == code
    assert is_transient(reply) is transient


def test_every_code_in_exchange_online_md_is_catalogued() -> None:
    table = DOCS.read_text().split("## Reply codes a relay must understand", 1)[1]
    codes = set()
    for row in table.splitlines():
        if not row.startswith("| ") or row.startswith("| Code") or row.startswith("|---"):
            continue
        first = row.split("|")[1].strip()
        parts = [x.strip() for x in first.split("/")]
        prefix = parts[0].rsplit(".", 1)[0]
        for part in parts:  # "5.7.705/708/750" abbreviates 5.7.708 and 5.7.750
            codes.add(part if "." in part else f"{prefix}.{part}")
    assert len(codes) >= 20
    for code in codes:
        code = code.replace("\N{EN DASH}", "-")
        if "-" in code:  # a documented range: both ends must land in one entry
            low, high = code.split("-")
            cls_sub = low.rsplit(".", 1)[0]
            for probe in (low, f"{cls_sub}.{high}"):
                assert classify(probe) is not None, probe
            continue
        entry = classify(code)
        assert entry is not None, code
        assert entry.covers(tuple(int(x) for x in code.split(".")))  # type: ignore[arg-type]


def test_parse_forms() -> None:
    assert parse_reply("550 5.7.60 SMTP; x").basic == 550
    assert parse_reply("535-5.7.139 Authentication unsuccessful").enhanced == (5, 7, 139)
    p = parse_reply("<#5.1.1 smtp;550 5.1.1 RESOLVER.ADR.RecipNotFound; not found>")
    assert (p.basic, p.enhanced_str) == (550, "5.1.1")
    p = parse_reply("5.7.64")
    assert (p.basic, p.enhanced_str, p.reply_class) == (None, "5.7.64", 5)
    p = parse_reply("550")
    assert (p.basic, p.enhanced) == (550, None)
    # An IP address or an AS() number is never mistaken for a code.
    p = parse_reply("Access denied [203.0.113.5] AS(201806281)")
    assert (p.basic, p.enhanced) == (None, None)


def test_variants_by_text() -> None:
    tenant = classify(
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant"
    )
    mailbox = classify(
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox"
    )
    defaults = classify(
        "535 5.7.139 Authentication unsuccessful, user is locked by your organization's "
        "security defaults policy"
    )
    assert tenant and mailbox and defaults
    assert "Set-TransportConfig" in tenant.fix
    assert "Set-CASMailbox" in mailbox.fix
    assert "Security Defaults" in defaults.fix
    quota = classify("554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed")
    store = classify(
        "554 5.2.0 STOREDRV.Deliver.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded"
    )
    assert quota and store and quota is not store
    assert is_transient("554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException")
    assert not is_transient("554 5.2.0 STOREDRV.Deliver.Exception:QuotaExceededException")
    relay = classify("550 5.7.1 Unable to relay")
    other = classify("550 5.7.1 Delivery not authorized, message refused")
    assert relay and other and relay.category is Category.RELAY and other.category is Category.SENDER


def test_transient_rules() -> None:
    # 4yz always transient, even with an unknown enhanced code.
    assert is_transient("450 4.2.1 try later")
    assert is_transient("421")
    # 5yz permanent unless flagged.
    assert not is_transient("550")
    assert not is_transient("554 5.9.9 something new")
    # OAuth/credential problems of relay365 itself defer (token outage never bounces the queue).
    assert is_transient("535 5.7.3 Authentication unsuccessful")
    assert is_transient("535 Authentication failed")
    # The basic code decides when it disagrees with the enhanced one.
    assert not is_transient("554 4.3.2 mailbox busy; STOREDRV.Deliver.Exception:StoragePermanentException")
    # No code at all: transient (patience may deliver), unless the text names a catalogued reply.
    assert is_transient("Connection lost")
    assert is_transient("Concurrent connections limit exceeded.")
    assert not is_transient("250 2.0.0 OK")


def test_unknown_returns_none() -> None:
    assert classify("hello world") is None
    assert classify("5.9.250") is None


def test_entries_are_well_formed() -> None:
    seen = entries()
    assert len(seen) >= 60
    for e in seen:
        assert e.source.startswith("https://"), e.code
        assert e.meaning and e.fix and e.text
        assert re.fullmatch(r"\d\.\d{1,3}\.\d{1,3}(-\d{1,3})?|\d{3}", e.code), e.code
        # A 4xx entry never claims to be permanent, a flagged 5xx is transient.
        assert e.transient is (e.reply_code // 100 == 4 or e.retryable)


def test_text_variants_and_hints() -> None:
    relay = classify("Remote Server returned '550 5.4.1 Relay Access Denied ATTR35'")
    edge = classify("550 5.4.1 Recipient address rejected: Access denied. AS(201806281)")
    assert relay and edge and relay is not edge
    assert relay.category is Category.RELAY and edge.category is Category.RECIPIENT
    # The "n/a" row of Microsoft's table has no code: matched by its text.
    quota = classify("The message can't be submitted because the sender's submission quota was exceeded")
    assert quota is not None and quota.retryable
    # Retry hints the transports use for pacing.
    assert classify("432 4.3.2 Concurrent connections limit exceeded.").retry_after == 60  # type: ignore[union-attr]
    assert classify("550 5.2.121 x").retry_after == 3600  # type: ignore[union-attr]
    assert classify("451 4.7.555 Access denied, please try again later").retry_after == 300  # type: ignore[union-attr]
    assert classify("550 5.7.60 SMTP; Client does not have permissions").retry_after is None  # type: ignore[union-attr]


def test_summary_for_logs_and_dsns() -> None:
    line = summary("550 5.7.64 TenantAttribution; Relay Access Denied")
    assert line.startswith("5.7.64 (relay / tenant attribution): ")
    assert "Fix: Fix the OnPremises inbound connector" in line
    assert summary("5.9.250") == "not in relay365's catalogue (permanent by its reply class)"
    assert summary("554 5.9.9 odd").startswith("554 (generic SMTP reply)")  # the basic code's fallback
    assert (
        summary("connection reset") == "not in relay365's catalogue (transient, retried by its reply class)"
    )
