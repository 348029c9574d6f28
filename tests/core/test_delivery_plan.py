"""The delivery decisions on their own (delivery/plan.py): which recipients an attempt is for, where
each goes, what a transport's answer means for each recipient, when it is tried again, when it
bounces and to whom. Pure functions: no spool, no socket, the clock is a number the test picks.
"""

from __future__ import annotations

import pytest

from relay365.delivery import plan
from relay365.delivery.dsn import Failure
from relay365.delivery.router import Router
from relay365.errors import (
    ConnectionLostError,
    PermanentDeliveryError,
    SpoolError,
    TransientDeliveryError,
    UpstreamUnreachableError,
)
from relay365.settings import DeliverySettings, RouteSettings
from relay365.spool.model import Envelope, QueueEntry, RcptState, Recipient, RecipientUpdate
from relay365.transports.base import Outcome, RecipientResult
from tests.support import T0

SETTINGS = DeliverySettings(min_backoff=60, max_backoff=600, queue_lifetime=3600)
OK = "250 2.0.0 OK"


def rcpt(addr: str, state: RcptState = RcptState.QUEUED, *, at: float = T0, attempts: int = 0) -> Recipient:
    return Recipient(addr, state, attempts, at, "451 4.4.1 earlier" if attempts else "")


def entry(*rcpts: Recipient, sender: str = "scanner@contoso.com", is_dsn: bool = False) -> QueueEntry:
    env = Envelope(sender, tuple(r.rcpt for r in rcpts), device="printer", is_dsn=is_dsn)
    return QueueEntry("Q1", env, 1000, T0, False, tuple(rcpts))


# -- planning an attempt ------------------------------------------------------------------------------
def test_due_recipients_are_open_and_due() -> None:
    e = entry(
        rcpt("due@contoso.com"),
        rcpt("later@contoso.com", RcptState.DEFERRED, at=T0 + 60, attempts=1),
        rcpt("again@contoso.com", RcptState.DEFERRED, at=T0, attempts=1),
        rcpt("done@contoso.com", RcptState.DELIVERED),
        rcpt("gone@contoso.com", RcptState.BOUNCED),
    )
    assert [r.rcpt for r in plan.due_recipients(e, T0)] == ["due@contoso.com", "again@contoso.com"]
    assert len(plan.due_recipients(e, T0 + 60)) == 3


def test_route_groups_recipients_per_route_in_order_and_bounces_the_unroutable() -> None:
    router = Router(
        (
            RouteSettings(name="fabrikam", transport="mx", recipient_domains=("fabrikam.com",)),
            RouteSettings(
                name="tenant", transport="graph", recipient_domains=("contoso.com",), fallbacks=("smtp",)
            ),
        )
    )
    e = entry(rcpt("a@contoso.com"), rcpt("b@fabrikam.com"), rcpt("c@contoso.com"), rcpt("d@example.net"))
    routes = plan.route(router, e, e.recipients)
    assert routes.groups == [
        plan.Group("graph", ("smtp",), ("a@contoso.com", "c@contoso.com")),
        plan.Group("mx", (), ("b@fabrikam.com",)),
    ]
    assert [(r, c.route) for r, c in routes.choices] == [
        ("a@contoso.com", "tenant"),
        ("b@fabrikam.com", "fabrikam"),
        ("c@contoso.com", "tenant"),
    ]
    updates, failures = routes.no_route()
    [(addr, why)] = routes.unroutable
    assert addr == "d@example.net" and "no route rule matches" in why
    assert failures == [Failure("d@example.net", f"{plan.NO_ROUTE_REPLY} ({why})")]
    assert updates == [RecipientUpdate("d@example.net", RcptState.BOUNCED, failures[0].reply)]


def test_postponed_recipients_keep_their_state_and_count_no_attempt() -> None:
    e = entry(rcpt("new@contoso.com"), rcpt("old@contoso.com", RcptState.DEFERRED, attempts=2))
    paced = plan.postponed(e, ["new@contoso.com", "old@contoso.com"], T0 + 30, reply="paced: limit")
    assert paced == [
        RecipientUpdate("new@contoso.com", RcptState.QUEUED, "paced: limit", T0 + 30, counts_attempt=False),
        RecipientUpdate(
            "old@contoso.com", RcptState.DEFERRED, "451 4.4.1 earlier", T0 + 30, counts_attempt=False
        ),
    ]
    [held] = plan.postponed(e, ["new@contoso.com"], T0 + 5)
    assert (held.reply, held.next_attempt, held.counts_attempt) == ("", T0 + 5, False)


# -- a transport's answer -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("error", "outcome", "retry_after"),
    [
        (TransientDeliveryError("421 4.3.2 busy", retry_after=90), Outcome.TRANSIENT, 90),
        (UpstreamUnreachableError("421 4.4.1 connection refused"), Outcome.TRANSIENT, None),
        (ConnectionLostError("421 4.4.2 connection lost"), Outcome.TRANSIENT, None),
        (PermanentDeliveryError("550 5.7.60 SendAs denied"), Outcome.PERMANENT, None),
    ],
)
def test_a_delivery_error_is_one_result_per_recipient(
    error: TransientDeliveryError | PermanentDeliveryError, outcome: Outcome, retry_after: float | None
) -> None:
    results = plan.results_for_error(["a@x.com", "b@x.com"], error)
    assert results == [RecipientResult(r, outcome, error.reply, retry_after) for r in ("a@x.com", "b@x.com")]


def test_a_transport_bug_is_a_visible_4xx() -> None:
    [res] = plan.results_for_bug(["a@x.com"], KeyError("mailbox"))
    assert res == RecipientResult(
        "a@x.com", Outcome.TRANSIENT, "451 4.3.0 internal error: KeyError: 'mailbox'"
    )
    # the relay's own errors are already worded for the admin
    assert plan.internal_reply(SpoolError("spool is full\n(disk)")) == "451 4.3.0 spool is full (disk)"
    assert len(plan.internal_reply(ValueError("x" * 2000))) < 600  # one bounded line


def test_recipients_without_a_result_are_deferred() -> None:
    got = plan.complete(
        ["a@x.com", "c@x.com", "b@x.com"], [RecipientResult("a@x.com", Outcome.DELIVERED, OK)]
    )
    assert got == [
        RecipientResult("a@x.com", Outcome.DELIVERED, OK),
        RecipientResult("b@x.com", Outcome.TRANSIENT, plan.NO_RESULT_REPLY),
        RecipientResult("c@x.com", Outcome.TRANSIENT, plan.NO_RESULT_REPLY),
    ]


@pytest.mark.parametrize(
    ("reply", "route_level"),
    [
        ("535 5.7.139 Authentication unsuccessful", True),
        ("550 5.7.60 SendAs permission denied", True),
        ("421 4.4.2 connection lost", True),
        # X.4.1 is read as Exchange's "recipient address rejected" whichever its class, so a 4.4.1
        # (RFC 3463: no answer from host) stays on its route too: the behaviour as it is
        ("421 4.4.1 connection refused", False),
        ("550 5.1.1 User unknown", False),  # RFC 3463 X.1.x: the address, not the way
        ("550 5.4.1 Recipient address rejected: Access denied", False),
        ("554 ", True),  # no enhanced status: 5.0.0
    ],
)
def test_only_route_level_failures_fall_back(reply: str, route_level: bool) -> None:
    assert plan.route_level(reply) is route_level
    results = [
        RecipientResult("a@x.com", Outcome.PERMANENT, reply),
        RecipientResult("b@x.com", Outcome.DELIVERED, OK),
    ]
    retry, final = plan.split_fallback(results, ("smtp",))
    assert retry == (["a@x.com"] if route_level else [])
    assert [r.rcpt for r in final] == (["b@x.com"] if route_level else ["a@x.com", "b@x.com"])
    assert plan.split_fallback(results, ()) == ([], results)  # no fallback left: everything settles


# -- settling a result --------------------------------------------------------------------------------
def settle(
    res: RecipientResult, *, attempts: int = 0, now: float = T0
) -> tuple[RecipientUpdate, Failure | None]:
    return plan.settle(res, attempts=attempts, received_at=T0, now=now, settings=SETTINGS)


def test_settle_delivered_and_permanent() -> None:
    assert settle(RecipientResult("a@x.com", Outcome.DELIVERED, OK)) == (
        RecipientUpdate("a@x.com", RcptState.DELIVERED, OK),
        None,
    )
    reply = "550 5.1.1 User unknown"
    assert settle(RecipientResult("a@x.com", Outcome.PERMANENT, reply)) == (
        RecipientUpdate("a@x.com", RcptState.BOUNCED, reply),
        Failure("a@x.com", reply),
    )


def test_settle_transient_backs_off_doubling_up_to_the_maximum() -> None:
    res = RecipientResult("a@x.com", Outcome.TRANSIENT, "451 4.4.1 timeout")
    waits = [settle(res, attempts=n, now=T0 + 10)[0].next_attempt - (T0 + 10) for n in range(6)]
    assert waits == [60, 120, 240, 480, 600, 600]
    update, failure = settle(res, attempts=0, now=T0 + 10)
    assert (update.state, update.reply, failure) == (RcptState.DEFERRED, "451 4.4.1 timeout", None)


def test_settle_honours_a_longer_retry_after_only() -> None:
    longer = RecipientResult("a@x.com", Outcome.TRANSIENT, "432 4.3.2 throttled", retry_after=900)
    shorter = RecipientResult("a@x.com", Outcome.TRANSIENT, "432 4.3.2 throttled", retry_after=5)
    assert settle(longer)[0].next_attempt == T0 + 900
    assert settle(shorter)[0].next_attempt == T0 + 60


def test_settle_bounces_as_expired_at_the_queue_lifetime() -> None:
    res = RecipientResult("a@x.com", Outcome.TRANSIENT, "451 4.4.1 timeout")
    assert settle(res, attempts=9, now=T0 + 3599)[0].state is RcptState.DEFERRED
    update, failure = settle(res, attempts=10, now=T0 + 3600)
    assert update == RecipientUpdate("a@x.com", RcptState.BOUNCED, "451 4.4.1 timeout")
    assert failure == Failure("a@x.com", "451 4.4.1 timeout", expired=True)


def test_throttle_pause_takes_retry_after_or_one_window() -> None:
    busy = RecipientResult(
        "a@x.com", Outcome.TRANSIENT, "432 4.3.2 Concurrent connections limit", retry_after=120
    )
    quota = RecipientResult("b@x.com", Outcome.PERMANENT, "554 5.2.0 SubmissionQuotaExceeded")
    unknown = RecipientResult("c@x.com", Outcome.PERMANENT, "550 5.1.1 User unknown")
    assert plan.throttle_pause([unknown, busy, quota], 60.0) == (120, busy.reply)
    assert plan.throttle_pause([quota], 60.0) == (60.0, quota.reply)
    assert plan.throttle_pause([unknown], 60.0) is None


def test_bounce_goes_to_the_sender_never_for_a_bounce() -> None:
    failures = [Failure("a@x.com", "550 5.1.1 User unknown")]
    assert plan.bounce_to(entry(rcpt("a@x.com")), failures) == "scanner@contoso.com"
    assert plan.bounce_to(entry(rcpt("a@x.com")), []) is None
    assert plan.bounce_to(entry(rcpt("a@x.com"), sender=""), failures) is None
    assert plan.bounce_to(entry(rcpt("a@x.com"), sender="x@contoso.com", is_dsn=True), failures) is None
