"""The reply-code catalogue (relay365.replies, a data file in the core) against real reply strings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay365.replies import Category, classify, entries, is_transient, parse_reply, summary

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
    assert len(seen) >= 130
    for e in seen:
        assert e.source.startswith("https://"), e.code
        assert e.meaning and e.fix and e.text
        if e.protocol == "graph":
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", e.code), e.code
            assert 400 <= e.reply_code < 600 and e.transient is e.retryable
            continue
        assert re.fullmatch(r"\d\.\d{1,3}\.\d{1,3}(-\d{1,3})?|\d{3}", e.code), e.code
        # A 4xx entry never claims to be permanent, a flagged 5xx is transient.
        assert e.transient is (e.reply_code // 100 == 4 or e.retryable)
        # The enhanced code's class agrees with the basic code's (RFC 3463 section 2).
        assert "." not in e.code or e.code[0] == str(e.reply_code)[0], e.code


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


# --- The most specific part of the text decides (issue 13 item 5) ---------------------------------
SCANNER_ERRORS = [
    # (reply, entry code, category, transient, a word the meaning must contain)
    (
        "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed "
        "to process message due to a permanent exception with message Cannot submit message.",
        "5.2.0",
        Category.SENDER,
        False,
        "Send As",
    ),
    (
        "554 5.2.252 SendAsDenied; scanner@contoso.com not allowed to send as copier@contoso.com; "
        "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
        "5.2.0",
        Category.SENDER,
        False,
        "Send As",
    ),
    (
        "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
        "4.3.2",
        Category.THROTTLING,
        True,
        "sending mailbox",
    ),
    (
        "432 4.3.2 STOREDRV.Deliver; recipient thread limit exceeded",
        "4.3.2",
        Category.THROTTLING,
        True,
        "recipient mailbox",
    ),
    (
        "554 5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException."
        "MapiExceptionShutoffQuotaExceeded",
        "5.2.2",
        Category.THROTTLING,
        True,
        "sending mailbox is full",
    ),
    (
        "554 5.2.0 STOREDRV.Deliver.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded",
        "5.2.0",
        Category.RECIPIENT,
        False,
        "recipient's mailbox is full",
    ),
    (
        "550 5.2.252 Sender throttled due to continuous send as denied errors.",
        "5.2.252",
        Category.SENDER,
        False,
        "Send",
    ),
    (
        "550 5.2.253 Sender throttled due to continuous invalid license errors.",
        "5.2.253",
        Category.AUTH,
        True,
        "licence",
    ),
]


@pytest.mark.parametrize(("reply", "code", "category", "transient", "word"), SCANNER_ERRORS)
def test_specific_text_wins_over_the_code(
    reply: str, code: str, category: Category, transient: bool, word: str
) -> None:
    entry = classify(reply)
    assert entry is not None and entry.code == code and entry.category is category, entry
    assert word in entry.meaning
    assert is_transient(reply) is transient


def test_send_as_denied_is_never_a_full_mailbox() -> None:
    """The regression of issue 13: SendAsDenied under 5.2.0 was explained as a full recipient mailbox."""
    for reply in (SCANNER_ERRORS[0][0], SCANNER_ERRORS[1][0]):
        entry = classify(reply)
        assert entry is not None
        assert "full" not in entry.meaning and "Add-RecipientPermission" in entry.fix
    # A store exception relay365 does not know by name keeps the generic store-driver meaning.
    generic = classify("554 5.2.0 STOREDRV.Deliver.Exception:StoragePermanentException; Failed")
    assert generic is not None and "exception name" in generic.meaning


def test_longest_marker_wins() -> None:
    # "SubmissionQuotaExceededException" contains "QuotaExceededException": the longer marker decides.
    quota = classify("554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException")
    assert quota is not None and quota.retryable and quota.category is Category.THROTTLING


GRAPH_REPLIES = [
    ("403 ErrorSendAsDenied: The user account which was used to submit this request ...", False),
    ("403 ErrorAccessDenied: Access is denied. Check credentials and try again.", True),
    ("401 InvalidAuthenticationToken: Access token is empty.", True),
    ("404 ErrorInvalidUser: The requested user 'x@contoso.com' is invalid.", True),
    ("404 MailboxNotEnabledForRESTAPI: The mailbox is either inactive, soft-deleted, or ...", True),
    ("429 ApplicationThrottled: Application is over its MailboxConcurrency limit.", True),
    ("400 ErrorInvalidRecipients: At least one recipient is not valid.", False),
    ("400 ErrorMimeContentInvalidBase64String: Invalid base64 string for MIME content.", False),
    ("503 ServiceNotAvailable: The service is temporarily unavailable.", True),
    ("500 SomethingNew: not catalogued, a 5xx", True),
    ("418 SomethingNew: not catalogued, a 4xx", False),
]


@pytest.mark.parametrize(("reply", "transient"), GRAPH_REPLIES)
def test_graph_errors(reply: str, transient: bool) -> None:
    parsed = parse_reply(reply)
    assert parsed.http_status == int(reply[:3]) and parsed.enhanced is None
    assert is_transient(reply) is transient
    entry = classify(reply)
    if "SomethingNew" in reply:
        assert entry is None
    else:
        assert entry is not None and entry.protocol == "graph" and entry.code == parsed.graph_code


def test_graph_transport_uses_the_catalogue() -> None:
    """The Graph transport's retry decision is the catalogue's, for every Graph entry."""
    from relay365.transports.base import Outcome
    from relay365.transports.graph import GraphError
    from relay365.transports.graph import classify as graph_classify

    for entry in entries():
        if entry.protocol != "graph":
            continue
        outcome = graph_classify(GraphError(entry.reply_code, entry.code, entry.text, None))
        assert (outcome is Outcome.TRANSIENT) is entry.transient, entry.code


def test_data_file_errors_name_the_entry_and_key() -> None:
    from relay365.errors import ConfigError
    from relay365.replies.catalogue import load_entries

    good = (
        '[[reply]]\ncode = "5.7.60"\nreply = 550\ncategory = "sender"\ntext = "t"\nmeaning = "m"\n'
        'fix = "f"\nsource = "https://example.org/x"\n'
    )
    assert load_entries(good)[0].code == "5.7.60"
    bad = {
        good.replace('category = "sender"', 'category = "nope"'): "reply[0].category",
        good.replace('source = "https://example.org/x"', 'source = "http://x"'): "reply[0].source",
        good.replace('code = "5.7.60"', 'code = "5.7"'): "reply[0].code",
        good + "colour = 1\n": "reply[0].colour",
        good.replace('source = "https://example.org/x"\n', ""): "reply[0].source",
        good.replace("reply = 550", 'reply = "550"'): "reply[0].reply",
    }
    for text, key in bad.items():
        with pytest.raises(ConfigError) as info:
            load_entries(text)
        assert key in info.value.key
