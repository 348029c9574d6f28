"""The DSN on its own (delivery/dsn.py): an RFC 3464 multipart/report with one status block per
failed recipient, the expired status 4.4.7, the hint line, bounded original headers."""

from __future__ import annotations

import email
import email.policy

from relay365.delivery.dsn import HEADER_LIMIT, Failure, build_dsn, original_headers, status_of


def test_status_of_a_reply() -> None:
    assert status_of("550 5.1.1 User unknown") == "5.1.1"
    assert status_of("451-4.7.500 Server busy") == "4.7.500"
    assert status_of("451 4.4.1 timeout", expired=True) == "4.4.7"  # RFC 3463: delivery time expired
    assert status_of("554 no status here") == "5.0.0"
    assert status_of("421 busy") == "4.0.0"
    assert status_of("garbage") == "5.0.0"


def test_original_headers_stop_at_the_body_and_are_bounded() -> None:
    assert original_headers(b"Subject: hi\r\nFrom: a@b\r\n\r\nbody") == b"Subject: hi\r\nFrom: a@b\r\n"
    huge = b"X-Long: " + b"a" * (2 * HEADER_LIMIT)
    assert len(original_headers(huge)) == HEADER_LIMIT


def test_build_dsn_is_a_delivery_status_report() -> None:
    failures = [
        Failure("alice@contoso.com", "550 5.1.1 User unknown"),
        Failure("bob@contoso.com", "451 4.4.1 timeout\r\n(after 3 tries)", expired=True),
    ]
    raw = build_dsn(
        hostname="relay.test",
        queue_id="Q1",
        original_sender="scanner@contoso.com",
        arrival=1_800_000_000.0,
        failures=failures,
        headers=b"Subject: scan\r\n",
        explain=lambda reply: "the mailbox does not exist" if "5.1.1" in reply else None,
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert b"\r\nTo: <scanner@contoso.com>\r\n" in raw and msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    text, status, headers = msg.iter_parts()
    body = text.get_content()
    assert "<alice@contoso.com>: 550 5.1.1 User unknown\r\n    the mailbox does not exist" in body
    assert "<bob@contoso.com>: 451 4.4.1 timeout (after 3 tries)" in body  # one line
    assert "longer than the queue lifetime" in body
    report = status.as_bytes().decode()
    assert "Reporting-MTA: dns; relay.test" in report and "X-Relay365-Queue-ID: Q1" in report
    assert "Final-Recipient: rfc822; alice@contoso.com" in report and "Status: 5.1.1" in report
    assert "Final-Recipient: rfc822; bob@contoso.com" in report and "Status: 4.4.7" in report
    assert headers.get_content_type() == "text/rfc822-headers"
    assert raw.endswith(b"Subject: scan\r\n\r\n--" + msg.get_boundary().encode() + b"--\r\n")
