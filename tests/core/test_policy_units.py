"""Per-device policy verdicts on their own (ingress/policy.py): addresses, senders, recipients, size
and recipient limits, the per-device rate on a clock the test moves, enhanced status codes."""

from __future__ import annotations

import pytest

from relay365.ingress import policy
from relay365.settings import DeviceSettings, ListenerSettings
from tests.support import Clock

DEVICE = DeviceSettings(
    name="printer",
    allowed_senders=("scanner@contoso.com", "@hr.contoso.com"),
    allowed_recipient_domains=("contoso.com",),
    max_message_size=1000,
    max_recipients=5,
    max_messages_per_minute=2,
)
LISTENER = ListenerSettings(name="lan", max_message_size=500, max_recipients=50)


@pytest.mark.parametrize(
    ("raw", "address", "reply"),
    [
        ("<a@contoso.com>", "a@contoso.com", None),
        ("<a@contoso.com>\r\n", "a@contoso.com", "501 5.5.2 Control characters in address"),
        ("<@relay.example:a@contoso.com>", "a@contoso.com", "553 5.1.3 Source routes are not accepted"),
        (
            "<a%b@contoso.com>",
            "a%b@contoso.com",
            "553 5.1.3 Bad recipient address syntax (relay forms are not accepted)",
        ),
        (
            "<a!b@contoso.com>",
            "a!b@contoso.com",
            "553 5.1.3 Bad recipient address syntax (relay forms are not accepted)",
        ),
        (
            "<a@[192.0.2.1]>",
            "a@[192.0.2.1]",
            "553 5.1.3 Bad recipient address syntax (relay forms are not accepted)",
        ),
        (f"<{'a' * 65}@contoso.com>", f"{'a' * 65}@contoso.com", "553 5.1.3 Bad recipient address syntax"),
        (
            "<root@printer>",
            "root@printer",
            "504 5.5.2 <root@printer>: Recipient address rejected: need fully-qualified address",
        ),
        (
            "<ü@contoso.com>",
            "ü@contoso.com",
            "553 5.6.7 Non-ASCII recipient address needs SMTPUTF8 (RFC 6531)",
        ),
    ],
)
def test_address_reply(raw: str, address: str, reply: str | None) -> None:
    assert policy.address_reply(raw, address, what="recipient") == reply


def test_address_reply_options() -> None:
    assert policy.address_reply("<>", "", what="sender") is None  # the null sender
    assert policy.address_reply("<root@printer>", "root@printer", what="sender", fqdn=False) is None
    assert policy.address_reply("<ü@contoso.com>", "ü@contoso.com", what="recipient", smtputf8=True) is None
    assert policy.helo_reply("printer-3.lan") is None
    assert policy.helo_reply("bad host") == "501 5.5.4 Invalid HELO/EHLO hostname"


def test_sender_and_recipient_verdicts() -> None:
    assert policy.sender_reply(DEVICE, "Scanner@Contoso.com") is None
    assert policy.sender_reply(DEVICE, "payroll@hr.contoso.com") is None
    assert (
        policy.sender_reply(DEVICE, "ceo@contoso.com")
        == "550 5.7.1 Device printer may not send as <ceo@contoso.com>"
    )
    assert policy.sender_reply(DEVICE, "") is not None  # the null sender matches only "*" or "<>"
    assert policy.sender_reply(DeviceSettings(name="any"), "") is None
    assert policy.sender_reply(DeviceSettings(name="dsn", allowed_senders=("<>",)), "") is None
    assert policy.recipient_reply(DEVICE, "a@CONTOSO.com", 0, 5) is None
    assert (
        policy.recipient_reply(DEVICE, "a@fabrikam.com", 0, 5)
        == "550 5.7.1 Device printer may not send to <a@fabrikam.com>"
    )
    assert policy.recipient_reply(DEVICE, "a@contoso.com", 5, 5) == "452 4.5.3 Too many recipients"


def test_limits_take_the_lower_of_device_and_listener() -> None:
    assert policy.max_size(DEVICE, LISTENER) == 500
    assert policy.max_size(None, LISTENER) == 500
    assert policy.max_size(DeviceSettings(name="d"), LISTENER) == 500
    assert policy.max_recipients(DEVICE, LISTENER) == 5
    assert policy.max_recipients(DeviceSettings(name="d"), LISTENER) == 50


def test_rate_limit_is_a_sliding_minute_on_the_clock() -> None:
    clock = Clock()
    rate = policy.RateLimiter(clock=clock)
    for _ in range(2):
        assert rate.reply(DEVICE) is None
        rate.accepted(DEVICE)
        clock.advance(20)
    assert rate.reply(DEVICE) == "450 4.7.1 Device printer is over its limit of 2 messages/minute"
    clock.advance(20)  # the first acceptance is 60 s old: out of the window
    assert rate.reply(DEVICE) is None
    unlimited = DeviceSettings(name="free")
    for _ in range(100):
        rate.accepted(unlimited)
    assert rate.reply(unlimited) is None


def test_replies_get_an_enhanced_status() -> None:
    assert policy.with_status("503 Error: send HELO first") == "503 5.5.1 Error: send HELO first"
    assert policy.with_status("250 2.0.0 Ok") == "250 2.0.0 Ok"
    assert policy.with_status("599 odd") == "599 5.0.0 odd"
    assert policy.with_status("250-ok") == "250-2.0.0 ok"
    assert policy.status_of("550 5.7.1 no") == "5.7.1" and policy.status_of("550 no") == ""
