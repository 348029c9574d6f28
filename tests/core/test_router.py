"""The router on its own (delivery/router.py): rules in order, every named condition must hold, a
transport's own recipient rule, the null sender only on transports that can carry it."""

from __future__ import annotations

import pytest

from relay365.delivery.router import NoRoute, RouteChoice, Router
from relay365.settings import RouteSettings

ROUTES = (
    RouteSettings(name="big", transport="graph", max_size=1000, devices=("scanner",)),
    RouteSettings(name="hr", transport="smtp", senders=("@hr.contoso.com",), fallbacks=("mx", "graph")),
    RouteSettings(name="partner", transport="mx", recipient_domains=("fabrikam.com",)),
    RouteSettings(name="rest", transport="smtp"),
)


def choose(
    router: Router, rcpt: str = "a@contoso.com", sender: str = "s@contoso.com", **kw: object
) -> RouteChoice:
    args: dict[str, object] = {"device": "printer", "size": 5000, **kw}
    return router.choose(rcpt=rcpt, sender=sender, **args)  # type: ignore[arg-type]


def test_first_matching_rule_wins_and_says_why() -> None:
    router = Router(ROUTES)
    assert choose(router, device="scanner", size=1000) == RouteChoice(
        "big", "graph", "matches device scanner, size 1000 <= 1000"
    )
    assert choose(router, device="scanner", size=1001).route == "rest"  # one condition fails: next rule
    assert choose(router, sender="Payroll@HR.contoso.com") == RouteChoice(
        "hr", "smtp", "matches sender <Payroll@HR.contoso.com>", ("mx", "graph")
    )
    assert choose(router, rcpt="b@FABRIKAM.com").route == "partner"  # domains compare case-insensitively
    assert choose(router) == RouteChoice("rest", "smtp", "catch-all route")


def test_no_rule_is_no_route() -> None:
    router = Router(ROUTES[2:3])
    with pytest.raises(NoRoute, match=r"no route for <a@contoso.com>: no route rule matches"):
        choose(router)


def test_a_transports_own_recipient_rule_skips_its_route() -> None:
    router = Router(ROUTES[2:], accepts={"smtp": lambda rcpt: rcpt.endswith("@contoso.com")})
    assert choose(router).route == "rest"
    with pytest.raises(NoRoute, match=r"route rest \(smtp\) only reaches the tenant's own domains"):
        choose(router, rcpt="x@example.net")


def test_null_sender_only_on_transports_that_carry_it() -> None:
    routes = (
        RouteSettings(name="tenant", transport="graph", fallbacks=("smtp", "mx")),
        RouteSettings(name="mx", transport="mx"),
    )
    router = Router(routes, null_sender=frozenset({"mx"}))
    assert choose(router).fallbacks == ("smtp", "mx")  # a real sender: every fallback
    assert choose(router, sender="") == RouteChoice("mx", "mx", "catch-all route")
    with pytest.raises(NoRoute, match=r"sends as a mailbox, not the null sender <>"):
        choose(Router(routes[:1], null_sender=frozenset({"mx"})), sender="")
    # a route naming <> as a sender matches the null sender; "*" too; an address never
    only_bounces = Router((RouteSettings(name="dsn", transport="mx", senders=("<>",)),))
    assert choose(only_bounces, sender="").route == "dsn"
    with pytest.raises(NoRoute):
        choose(only_bounces)
