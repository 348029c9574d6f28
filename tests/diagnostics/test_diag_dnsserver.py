"""The loopback authoritative DNS server, queried by dnspython over real UDP and TCP sockets."""

from __future__ import annotations

import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import dns.resolver
import pytest

from relay365.diagnostics.dnsserver import DnsServer, DnsServerError, ThreadedDnsServer
from relay365.errors import ConfigError
from relay365.netdns import make_async_resolver, make_resolver, parse_nameserver

LONG = "v=spf1 " + " ".join(f"ip4:198.51.100.{i}" for i in range(1, 40)) + " -all"
ZONE = {
    "contoso.com": {
        "MX": [(0, "contoso-com.mail.protection.outlook.com")],
        "TXT": ["v=spf1 include:spf.protection.outlook.com -all", "MS=ms12345"],
        "A": ["192.0.2.10"],
        "AAAA": ["2001:db8::10"],
    },
    "long.test": {"TXT": [LONG, LONG.replace("-all", "~all"), "x" * 300]},
    "alias.test": {"CNAME": ["contoso.com"]},
    "lower.test": {"mx": [(5, "mx.lower.test")]},
    "broken.test": "SERVFAIL",
    "gone.test": "NXDOMAIN",
    "slow.test": "TIMEOUT",
}


async def test_records_over_udp() -> None:
    async with DnsServer(ZONE) as srv:
        res = make_async_resolver(srv.nameserver)
        mx = await res.resolve("contoso.com", "MX")
        assert [(r.preference, r.exchange.to_text()) for r in mx] == [
            (0, "contoso-com.mail.protection.outlook.com.")
        ]
        txt = sorted(b"".join(r.strings).decode() for r in await res.resolve("contoso.com", "TXT"))
        assert txt == ["MS=ms12345", "v=spf1 include:spf.protection.outlook.com -all"]
        assert [r.address for r in await res.resolve("contoso.com", "A")] == ["192.0.2.10"]
        assert [r.address for r in await res.resolve("contoso.com", "AAAA")] == ["2001:db8::10"]
        assert ("udp", "contoso.com.", "MX") in srv.queries
        assert [r.preference for r in await res.resolve("lower.test", "MX")] == [5]  # type keys any case


async def test_failure_variants() -> None:
    async with DnsServer(ZONE) as srv:
        res = make_async_resolver(srv.nameserver, timeout=5)
        quick = make_async_resolver(srv.nameserver, timeout=0.5)
        with pytest.raises(dns.resolver.NXDOMAIN):
            await res.resolve("gone.test", "TXT")
        with pytest.raises(dns.resolver.NXDOMAIN):
            await res.resolve("not-in-zone.test", "A")
        with pytest.raises(dns.resolver.NoNameservers):
            await res.resolve("broken.test", "MX")
        with pytest.raises(dns.resolver.NoAnswer):
            await res.resolve("contoso.com", "PTR")
        with pytest.raises(dns.exception.Timeout):
            await quick.resolve("slow.test", "MX")


async def test_truncation_falls_back_to_tcp_and_long_txt_is_split() -> None:
    async with DnsServer(ZONE) as srv:
        q = dns.message.make_query("long.test", "TXT", use_edns=False)
        udp = await dns.asyncquery.udp(q, "127.0.0.1", port=srv.port, timeout=2)
        assert udp.flags & dns.flags.TC
        tcp = await dns.asyncquery.tcp(q, "127.0.0.1", port=srv.port, timeout=2)
        assert tcp.rcode() == dns.rcode.NOERROR
        strings = [r.strings for r in tcp.answer[0]]
        assert any(len(s) == 2 and len(s[0]) == 255 for s in strings)  # 300 octets -> 255 + 45
        # The resolver does the same fallback on its own.
        res = make_async_resolver(srv.nameserver)
        answers = await res.resolve("long.test", "TXT")
        assert {b"".join(r.strings).decode() for r in answers} >= {LONG}
        assert any(t == "tcp" for t, _, _ in srv.queries)


async def test_cname_is_followed() -> None:
    async with DnsServer(ZONE) as srv:
        res = make_async_resolver(srv.nameserver)
        answer = await res.resolve("alias.test", "A")
        assert [r.address for r in answer] == [
            "192.0.2.10"
        ] or answer.canonical_name.to_text() == "contoso.com."


def test_threaded_server_for_sync_callers() -> None:
    with ThreadedDnsServer(ZONE) as srv:
        res = make_resolver(srv.nameserver)
        assert [r.address for r in res.resolve("contoso.com", "A")] == ["192.0.2.10"]


def test_bad_zone_and_nameserver() -> None:
    with pytest.raises(DnsServerError):
        DnsServer({"x.test": {"MX": ["not a pair"]}})
    with pytest.raises(DnsServerError):
        DnsServer({"x.test": "EXPLODE"})
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("[::1]:53") == ("::1", 53)
    assert parse_nameserver("127.0.0.1") == ("127.0.0.1", 53)
    with pytest.raises(ConfigError):
        parse_nameserver("dns.example:53")
    with pytest.raises(ConfigError):
        parse_nameserver("127.0.0.1:99999")
