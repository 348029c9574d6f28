"""Which transport takes which recipient. Rules are tried in order; the first that matches wins.

A rule matches on recipient domain, envelope sender, device and message size; every condition it
names must hold. A message whose recipients match different routes is split per route. Mail from the
null sender ``<>`` only takes routes (and fallbacks) whose transport can carry it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from relay365.settings import NULL_SENDER, RouteSettings


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
    if not s:
        return any(p in ("*", NULL_SENDER) for p in patterns)
    return any(p == "*" or (p.startswith("@") and s.endswith(p)) or p == s for p in patterns)


class Router:
    """``accepts`` maps a transport name to its own recipient rule (Direct Send: accepted domains);
    ``null_sender`` names the transports that can send from ``<>`` (None: all of them)."""

    def __init__(
        self,
        routes: Sequence[RouteSettings],
        accepts: Mapping[str, Callable[[str], bool]] | None = None,
        *,
        null_sender: frozenset[str] | None = None,
    ) -> None:
        self._routes = tuple(routes)
        self._accepts = dict(accepts or {})
        self._null_sender = null_sender

    def _carries(self, transport: str, sender: str) -> bool:
        return bool(sender) or self._null_sender is None or transport in self._null_sender

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
            if not self._carries(r.transport, sender):
                refused.append(f"route {r.name} ({r.transport}) sends as a mailbox, not the null sender <>")
                continue
            reason = "matches " + ", ".join(why) if why else "catch-all route"
            fallbacks = tuple(f for f in r.fallbacks if self._carries(f, sender))
            return RouteChoice(r.name, r.transport, reason, fallbacks)
        detail = "; ".join(refused) if refused else "no route rule matches"
        raise NoRoute(f"no route for <{rcpt}>: {detail}")
