"""The transport registry (each transport module declares its kind) and the one DNS resolver builder."""

from __future__ import annotations

from pathlib import Path

import dns.asyncresolver
import dns.resolver
import pytest

from relay365 import settings as settings_module
from relay365.errors import ConfigError
from relay365.netdns import make_async_resolver, make_resolver, parse_nameserver
from relay365.transports.base import Transport
from relay365.transports.registry import (
    KINDS,
    build_transport,
    null_sender_transports,
    recipient_rules,
)
from tests.support import make_settings


def test_every_configurable_type_has_a_kind() -> None:
    assert set(KINDS) == set(settings_module._TYPE_DEFAULTS)
    for name, load in KINDS.items():  # each module is imported on first use, and declares its own type
        assert load().type == name


def _transports(tmp_path: Path) -> list[dict[str, object]]:
    return [
        {"name": "sink", "type": "smarthost", "host": "127.0.0.1", "port": 2500, "tls": "none"},
        {"name": "ds", "type": "direct_send", "accepted_domains": ["contoso.com"]},
        {"name": "conn", "type": "connector", "host": "127.0.0.1"},
        {
            "name": "sub",
            "type": "submission",
            "mailbox": "scanner@contoso.com",
            "auth": "basic",
            "username": "scanner@contoso.com",
            "password_env": "RELAY365_TEST_REGISTRY_PW",
        },
    ]


def test_rules_and_null_sender_come_from_the_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY365_TEST_REGISTRY_PW", "x")
    s = make_settings(tmp_path, transport=_transports(tmp_path))
    rules = recipient_rules(s)
    assert set(rules) == {"ds"}  # only Direct Send limits its recipients
    assert rules["ds"]("alice@CONTOSO.com") and not rules["ds"]("bob@example.org")
    assert null_sender_transports(s) == frozenset({"sink", "ds", "conn"})  # not SMTP AUTH submission
    built = build_transport(s.transport("sink"), hostname="relay.test")
    assert isinstance(built, Transport) and built.name == "sink"


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:5300", ("::1", 5300)),
        ("::1", ("::1", 53)),
        ("[::1]", ("::1", 53)),
    ],
)
def test_nameserver_forms(text: str, parsed: tuple[str, int]) -> None:
    assert parse_nameserver(text) == parsed


@pytest.mark.parametrize("text", ["dns.example", "127.0.0.1:0", "127.0.0.1:x", "[::1]x", "127.0.0.1:70000"])
def test_bad_nameservers_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="nameserver"):
        parse_nameserver(text)


def test_resolvers_from_one_builder() -> None:
    sync = make_resolver(["127.0.0.1:5300", "127.0.0.2:5300"], timeout=2)
    assert isinstance(sync, dns.resolver.Resolver)
    assert (sync.nameservers, sync.port, sync.lifetime) == (["127.0.0.1", "127.0.0.2"], 5300, 2)
    one = make_async_resolver("[::1]:5301")
    assert isinstance(one, dns.asyncresolver.Resolver)
    assert (one.nameservers, one.port) == (["::1"], 5301)
    with pytest.raises(ConfigError, match="same port"):
        make_resolver(["127.0.0.1:53", "127.0.0.2:5300"])


def test_settings_check_transport_nameservers(tmp_path: Path) -> None:
    t = {"name": "ds", "type": "direct_send", "accepted_domains": ["contoso.com"], "nameservers": ["dns"]}
    with pytest.raises(ConfigError) as e:
        make_settings(tmp_path, transport=[t])
    assert "transport[0].nameservers" in str(e.value) and "'dns'" in str(e.value)
