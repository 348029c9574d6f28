"""SPF: recommended record, merge with DNS, warnings, and pyspf evaluation against the loopback server."""

from __future__ import annotations

import asyncio
import json

import pytest
from typer.testing import CliRunner

from relay365.cli import app
from relay365.diagnostics import spf
from relay365.diagnostics.dnsserver import DnsServer, ThreadedDnsServer
from relay365.netdns import make_resolver

MS = "v=spf1 ip4:40.92.0.0/15 ip4:40.107.0.0/16 ip6:2a01:111:f400::/48 -all"
ZONE = {
    "spf.protection.outlook.com": {"TXT": [MS]},
    "hardfail.test": {"TXT": ["v=spf1 include:spf.protection.outlook.com -all", "MS=ms999"]},
    "merged.test": {"TXT": ["v=spf1 ip4:203.0.113.5 include:spf.protection.outlook.com -all"]},
    "soft.test": {"TXT": ["v=spf1 mx ~all"], "MX": [(10, "mx.soft.test")]},
    "mx.soft.test": {"A": ["198.51.100.20"]},
    "twice.test": {"TXT": ["v=spf1 -all", "v=spf1 ip4:203.0.113.5 ~all"]},
    "open.test": {"TXT": ["v=spf1 +all"]},
    "none.test": {"TXT": ["google-site-verification=abc"]},
    "many.test": {"TXT": ["v=spf1 " + " ".join(f"include:i{n}.test" for n in range(11)) + " -all"]},
    **{f"i{n}.test": {"TXT": [f"v=spf1 ip4:192.0.2.{n} -all"]} for n in range(11)},
    "broken.test": "SERVFAIL",
}


def test_recommended_record_v4_and_v6() -> None:
    assert (
        spf.recommended_record("203.0.113.5")
        == "v=spf1 ip4:203.0.113.5 include:spf.protection.outlook.com ~all"
    )
    assert (
        spf.recommended_record("2001:db8::5")
        == "v=spf1 ip6:2001:db8::5 include:spf.protection.outlook.com ~all"
    )
    with pytest.raises(ValueError):
        spf.recommended_record("not-an-ip")


def test_merge_keeps_existing_terms_and_qualifier() -> None:
    m = spf.merge("v=spf1 mx include:_spf.example.net -all", "203.0.113.5")
    assert (
        m.record
        == "v=spf1 ip4:203.0.113.5 mx include:_spf.example.net include:spf.protection.outlook.com -all"
    )
    assert m.added == ("ip4:203.0.113.5", "include:spf.protection.outlook.com")
    # Already covered by a network: nothing to add.
    m = spf.merge("v=spf1 ip4:203.0.113.0/24 include:spf.protection.outlook.com ~all", "203.0.113.5")
    assert not m.changed
    # redirect= without all: terms go before the redirect, no all appended.
    m = spf.merge("v=spf1 redirect=_spf.example.net", "203.0.113.5")
    assert m.record == "v=spf1 ip4:203.0.113.5 include:spf.protection.outlook.com redirect=_spf.example.net"
    # No all at all: ~all appended; no record: the recommended one.
    assert spf.merge("v=spf1 mx", "203.0.113.5").record.endswith(" ~all")
    assert spf.merge(None, "2001:db8::5").record == spf.recommended_record("2001:db8::5")


def test_static_warnings() -> None:
    assert any("+all" in w for w in spf.static_warnings("v=spf1 +all"))
    assert any("+all" in w for w in spf.static_warnings("v=spf1 ip4:192.0.2.1 all"))
    assert any("missing include" in w for w in spf.static_warnings("v=spf1 ip4:192.0.2.1 -all"))
    assert any("ptr" in w for w in spf.static_warnings("v=spf1 ptr include:spf.protection.outlook.com -all"))
    assert spf.static_warnings("v=spf1 ip4:192.0.2.1 include:spf.protection.outlook.com ~all") == []


async def test_pyspf_uses_the_given_resolver() -> None:
    """pyspf evaluates against the loopback server: these domains exist nowhere else."""
    async with DnsServer(ZONE) as srv:
        res = make_resolver(srv.nameserver, timeout=5)

        def run(ip: str, domain: str) -> str:
            return spf.evaluate(ip, f"printer@{domain}", res).result

        assert await asyncio.to_thread(run, "203.0.113.5", "merged.test") == "pass"
        assert await asyncio.to_thread(run, "40.107.1.1", "hardfail.test") == "pass"  # via the include
        assert await asyncio.to_thread(run, "203.0.113.5", "hardfail.test") == "fail"
        assert await asyncio.to_thread(run, "198.51.100.20", "soft.test") == "pass"  # mx mechanism
        assert await asyncio.to_thread(run, "203.0.113.5", "soft.test") == "softfail"
        assert await asyncio.to_thread(run, "203.0.113.5", "none.test") == "none"
        assert await asyncio.to_thread(run, "203.0.113.5", "twice.test") == "permerror"
        assert await asyncio.to_thread(run, "203.0.113.5", "broken.test") == "temperror"
        assert ("udp", "spf.protection.outlook.com.", "TXT") in srv.queries
        assert ("udp", "mx.soft.test.", "A") in srv.queries


async def test_report_merges_with_published_record() -> None:
    async with DnsServer(ZONE) as srv:
        res = make_resolver(srv.nameserver, timeout=5)
        report = await asyncio.to_thread(spf.build_report, "203.0.113.5", "hardfail.test", res)
        assert report.existing == ("v=spf1 include:spf.protection.outlook.com -all",)
        assert report.proposed == "v=spf1 ip4:203.0.113.5 include:spf.protection.outlook.com -all"
        assert report.current_result == "fail"
        assert report.lookups == 1
        assert report.warnings == ()
        twice = await asyncio.to_thread(spf.build_report, "203.0.113.5", "twice.test", res)
        assert any("2 SPF records" in w for w in twice.warnings)
        many = await asyncio.to_thread(spf.build_report, "203.0.113.5", "many.test", res)
        assert many.lookups == 12  # 11 includes + Microsoft's include (their records have none)
        assert any("over the limit of 10" in w for w in many.warnings)
        opened = await asyncio.to_thread(spf.build_report, "203.0.113.5", "open.test", res)
        assert any("+all" in w for w in opened.warnings)
        assert opened.current_result == "pass"
        broken = await asyncio.to_thread(spf.build_report, "203.0.113.5", "broken.test", res)
        assert any("could not read" in w for w in broken.warnings)
        assert broken.proposed == spf.recommended_record("203.0.113.5")


def test_cli_spf_json_and_rich() -> None:
    with ThreadedDnsServer(ZONE) as srv:
        runner = CliRunner()
        result = runner.invoke(
            app,
            ["spf", "--ip", "203.0.113.5", "--domain", "soft.test", "--nameserver", srv.nameserver, "--json"],
        )
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        assert data["proposed"] == "v=spf1 ip4:203.0.113.5 mx include:spf.protection.outlook.com ~all"
        assert data["current_result"] == "softfail"
        rich_out = runner.invoke(
            app, ["spf", "--ip", "203.0.113.5", "--domain", "merged.test", "--nameserver", srv.nameserver]
        )
        assert rich_out.exit_code == 0, rich_out.output
        assert "SPF pass for 203.0.113.5" in rich_out.output
    plain = CliRunner().invoke(app, ["spf", "--ip", "2001:db8::5", "--json"])
    assert (
        json.loads(plain.output)["recommended"]
        == "v=spf1 ip6:2001:db8::5 include:spf.protection.outlook.com ~all"
    )
    bad = CliRunner().invoke(app, ["spf", "--ip", "nope"])
    assert bad.exit_code == 2
