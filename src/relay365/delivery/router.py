"""Which transport takes which recipient. Rules are tried in order; the first that matches wins.

A rule matches on recipient domain, envelope sender, device and message size; every condition it
names must hold. A message whose recipients match different routes is split per route.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from relay365.settings import RouteSettings


@dataclass(frozen=True, slots=True)
class RouteChoice:
    route: str
    transport: str
    reason: str
    fallbacks: tuple[str, ...] = ()


class NoRoute(LookupError):
    """No route matches a recipient."""


def _sender_ok(patterns: tuple[str, ...], sender: str) -> bool:
    s = sender.lower()
    return any(p == "*" or (p.startswith("@") and s.endswith(p)) or p == s for p in patterns)


class Router:
    """``accepts`` maps a transport name to its own recipient rule (Direct Send: accepted domains)."""

    def __init__(
        self, routes: Sequence[RouteSettings], accepts: Mapping[str, Callable[[str], bool]] | None = None
    ) -> None:
        self._routes = tuple(routes)
        self._accepts = dict(accepts or {})

    def choose(self, *, rcpt: str, sender: str, device: str, size: int) -> RouteChoice:
        domain = rcpt.rpartition("@")[2].lower()
        refused: list[str] = []
        for r in self._routes:
            why: list[str] = []
            if r.recipient_domains:
                if domain not in r.recipient_domains:
                    continue
                why.append(f"recipient domain {domain}")
            if r.senders:
                if not _sender_ok(r.senders, sender):
                    continue
                why.append(f"sender <{sender}>")
            if r.devices:
                if device not in r.devices:
                    continue
                why.append(f"device {device}")
            if r.max_size is not None:
                if size > r.max_size:
                    continue
                why.append(f"size {size} <= {r.max_size}")
            accepts = self._accepts.get(r.transport)
            if accepts is not None and not accepts(rcpt):
                refused.append(f"route {r.name} ({r.transport}) only reaches the tenant's own domains")
                continue
            reason = "matches " + ", ".join(why) if why else "catch-all route"
            return RouteChoice(r.name, r.transport, reason, r.fallbacks)
        detail = "; ".join(refused) if refused else "no route rule matches"
        raise NoRoute(f"no route for <{rcpt}>: {detail}")
