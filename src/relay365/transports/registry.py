"""Which transport types exist: each transport module declares its own :class:`TransportKind` (how to
build it from its settings, which recipients it can reach, whether it can carry the null sender), and
this registry is the only list of them. The composition root, ``route test`` and the preflight build
transports and routing rules from here, never from a hard-coded table of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from relay365.errors import ConfigError
from relay365.settings import Settings, TransportSettings
from relay365.transports.base import RecipientRule, Transport, TransportKind

# Each transport type's module is imported when a transport of that type is built or checked (issue 11:
# a relay that only uses a smarthost never loads msal/httpx for OAuth and Graph).


def _smarthost() -> TransportKind:
    from relay365.transports import smarthost

    return smarthost.KIND


def _submission() -> TransportKind:
    from relay365.transports import submission

    return submission.KIND


def _direct_send() -> TransportKind:
    from relay365.transports import direct_send

    return direct_send.KIND


def _connector() -> TransportKind:
    from relay365.transports import connector

    return connector.KIND


def _graph() -> TransportKind:
    from relay365.transports import graph

    return graph.KIND


KINDS: Mapping[str, Callable[[], TransportKind]] = {
    "smarthost": _smarthost,
    "submission": _submission,
    "direct_send": _direct_send,
    "connector": _connector,
    "graph": _graph,
}


def kind_of(settings: TransportSettings) -> TransportKind:
    try:
        load = KINDS[settings.type]
    except KeyError:
        raise ConfigError(
            f"transport {settings.name}.type", settings.type, "This transport type is not available."
        ) from None
    return load()


def build_transport(settings: TransportSettings, *, hostname: str) -> Transport:
    return kind_of(settings).factory(settings, hostname)


def recipient_rules(settings: Settings) -> dict[str, RecipientRule]:
    """Each configured transport's own recipient rule, for the router."""
    rules: dict[str, RecipientRule] = {}
    for t in settings.transports:
        rule = kind_of(t).recipient_rule(t)
        if rule is not None:
            rules[t.name] = rule
    return rules


def null_sender_transports(settings: Settings) -> frozenset[str]:
    """The configured transports that can send mail from ``<>`` as it is."""
    return frozenset(t.name for t in settings.transports if kind_of(t).carries_null_sender)
