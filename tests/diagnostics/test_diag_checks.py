"""Each doctor check's pass, warn and fail paths against live loopback peers."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from relay365.diagnostics.checks import CheckResult, Status
from relay365.diagnostics.checks.dns import check_mx
from relay365.diagnostics.checks.network import check_tcp
from relay365.diagnostics.checks.smtp import check_ehlo
from relay365.diagnostics.checks.spf_check import check_spf
from relay365.diagnostics.checks.tls import check_tls
from relay365.diagnostics.dnsserver import DnsServer
from relay365.netdns import make_async_resolver, make_resolver

from .peers import Certs, SmtpBehaviour, SmtpListener, closed_port

MS = "v=spf1 ip4:40.92.0.0/15 ip4:40.107.0.0/16 -all"
INC = "include:spf.protection.outlook.com"
ZONE = {
    "spf.protection.outlook.com": {"TXT": [MS]},
    "contoso.test": {
        "MX": [(0, "contoso-test.mail.protection.outlook.com")],
        "TXT": [f"v=spf1 ip4:203.0.113.5 {INC} ~all"],
    },
    "contoso-test.mail.protection.outlook.com": {"A": ["127.0.0.1"]},
    "gateway.test": {"MX": [(10, "mx.gateway.test")], "TXT": [f"v=spf1 {INC} -all"]},
    "mx.gateway.test": {"A": ["127.0.0.1"]},
    "lost.test": {"MX": [(0, "lost-test.mail.protection.outlook.com")]},
    "mixed.test": {"MX": [(10, "mx.gateway.test"), (20, "mixed-test.mail.protection.outlook.com")]},
    "mixed-test.mail.protection.outlook.com": {"A": ["127.0.0.1"]},
    "nomx.test": {"TXT": ["hello"]},
    "neutral.test": {"TXT": [f"v=spf1 {INC} ?all"]},
    "strict.test": {"TXT": [f"v=spf1 {INC} -all"]},
    "open.test": {"TXT": [f"v=spf1 {INC} +all"]},
    "noinc.test": {"TXT": ["v=spf1 ip4:203.0.113.5 -all"]},
    "twice.test": {"TXT": ["v=spf1 -all", "v=spf1 ~all"]},
    "syntax.test": {"TXT": ["v=spf1 ip4:999.1.1.1 foo:bar -all"]},
    "nine.test": {"TXT": ["v=spf1 " + " ".join(f"include:n{i}.test" for i in range(8)) + f" {INC} -all"]},
    "eleven.test": {"TXT": ["v=spf1 " + " ".join(f"include:n{i}.test" for i in range(10)) + f" {INC} -all"]},
    **{f"n{i}.test": {"TXT": [f"v=spf1 ip4:198.51.100.{i} -all"]} for i in range(10)},
    "gone.test": "NXDOMAIN",
    "broken.test": "SERVFAIL",
    "slow.test": "TIMEOUT",
}


def by_name(results: list[CheckResult], prefix: str) -> CheckResult:
    found = [r for r in results if r.name.startswith(prefix)]
    assert len(found) == 1, (prefix, results)
    return found[0]


# --- DNS: MX ---------------------------------------------------------------------------------------------
async def test_mx_pass_warn_fail() -> None:
    async with DnsServer(ZONE) as srv:
        res = make_async_resolver(srv.nameserver, timeout=5)
        quick = make_async_resolver(srv.nameserver, timeout=0.5)  # only for the TIMEOUT name
        ok = await check_mx("contoso.test", res)
        assert [r.status for r in ok] == [Status.PASS, Status.PASS]
        assert "contoso-test.mail.protection.outlook.com" in ok[0].detail
        assert "127.0.0.1" in ok[1].detail
        gw = await check_mx("gateway.test", res)
        assert gw[0].status is Status.WARN and "gateway-test.mail.protection.outlook.com" in gw[0].fix
        assert gw[1].status is Status.FAIL  # the derived tenant endpoint does not resolve here
        mixed = await check_mx("mixed.test", res)
        assert mixed[0].status is Status.WARN and "not the preferred MX" in mixed[0].detail
        assert mixed[1].status is Status.PASS  # its tenant endpoint resolves
        lost = await check_mx("lost.test", res)
        assert (lost[0].status, lost[1].status) == (Status.PASS, Status.FAIL)
        for domain, text in [("nomx.test", "no MX"), ("gone.test", "NXDOMAIN"), ("broken.test", "SERVFAIL"),
                             ("slow.test", "timed out")]:  # fmt: skip
            (r,) = await check_mx(domain, quick if domain == "slow.test" else res)
            assert r.status is Status.FAIL and text in r.detail and r.fix


# --- SPF -------------------------------------------------------------------------------------------------
async def test_spf_all_pass() -> None:
    async with DnsServer(ZONE) as srv:
        results = await check_spf(
            "contoso.test", make_resolver(srv.nameserver, timeout=5), public_ip="203.0.113.5"
        )
        assert {r.status for r in results} == {Status.PASS}, results
        assert by_name(results, "SPF authorises").detail == "pass for contoso.test"
        assert "~all" in by_name(results, "SPF all").detail
        assert by_name(results, "SPF lookups").detail.startswith("1 DNS lookups")


async def test_spf_warn_paths() -> None:
    async with DnsServer(ZONE) as srv:
        res = make_resolver(srv.nameserver, timeout=5)
        neutral = await check_spf("neutral.test", res, public_ip="203.0.113.5")
        assert by_name(neutral, "SPF authorises").status is Status.WARN
        assert "ip4:203.0.113.5" in by_name(neutral, "SPF authorises").fix
        assert by_name(neutral, "SPF all").status is Status.WARN
        nine = await check_spf("nine.test", res, public_ip=None)
        assert by_name(nine, "SPF lookups").status is Status.WARN
        assert by_name(nine, "SPF lookups").detail.startswith("9 DNS lookups")


async def test_spf_fail_paths() -> None:
    async with DnsServer(ZONE) as srv:
        res = make_resolver(srv.nameserver, timeout=5)
        strict = await check_spf("strict.test", res, public_ip="203.0.113.5")
        ip = by_name(strict, "SPF authorises")
        assert ip.status is Status.FAIL and ip.fix == f"Publish 'v=spf1 ip4:203.0.113.5 {INC} -all'"
        assert by_name(strict, "SPF all").status is Status.PASS  # -all is fine, with advice
        (none,) = await check_spf("nomx.test", res, public_ip="203.0.113.5")
        assert none.status is Status.FAIL and "ip4:203.0.113.5" in none.fix
        twice = await check_spf("twice.test", res, public_ip=None)
        assert by_name(twice, "SPF single").status is Status.FAIL
        assert by_name(await check_spf("syntax.test", res, public_ip=None), "SPF valid").status is Status.FAIL
        assert (
            by_name(await check_spf("eleven.test", res, public_ip=None), "SPF lookups").status is Status.FAIL
        )
        assert (
            by_name(await check_spf("noinc.test", res, public_ip=None), "SPF Microsoft").status is Status.FAIL
        )
        assert by_name(await check_spf("open.test", res, public_ip=None), "SPF all").status is Status.FAIL
        (broken,) = await check_spf("broken.test", res, public_ip=None)
        assert broken.status is Status.FAIL and "SERVFAIL" in broken.detail


# --- TCP -------------------------------------------------------------------------------------------------
async def test_tcp_pass_and_closed_port() -> None:
    async with SmtpListener(SmtpBehaviour()) as lis:
        ok = await check_tcp("127.0.0.1", lis.port, timeout_s=10)
        assert ok.status is Status.PASS and "connected" in ok.detail
    with closed_port() as port:
        closed = await check_tcp("127.0.0.1", port, timeout_s=10)
        assert closed.status is Status.FAIL and "refused" in closed.detail


# --- TLS -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(Path(tmp_path_factory.mktemp("certs")))


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-465", "starttls"])
async def test_tls_valid_certificate(certs: Certs, implicit: bool) -> None:
    b = SmtpBehaviour(tls=certs.server_context(certs.valid), implicit_tls=implicit)
    async with SmtpListener(b) as lis:
        hs, cert = await check_tls(
            "127.0.0.1", lis.port, starttls=not implicit, ca_file=certs.ca_file, timeout_s=10
        )
        assert hs.status is Status.PASS and hs.detail.startswith("TLSv1.")
        assert cert.status is Status.PASS and "chain trusted" in cert.detail


async def test_tls_expiring_soon_warns(certs: Certs) -> None:
    b = SmtpBehaviour(tls=certs.server_context(certs.soon), implicit_tls=True)
    async with SmtpListener(b) as lis:
        _, cert = await check_tls("127.0.0.1", lis.port, starttls=False, ca_file=certs.ca_file, timeout_s=10)
        assert cert.status is Status.WARN and "expires in" in cert.detail


async def test_tls_expired_certificate_fails(certs: Certs) -> None:
    b = SmtpBehaviour(tls=certs.server_context(certs.expired), implicit_tls=True)
    async with SmtpListener(b) as lis:
        hs, cert = await check_tls("127.0.0.1", lis.port, starttls=False, ca_file=certs.ca_file, timeout_s=10)
        assert hs.status is Status.PASS  # the handshake itself works
        assert (
            cert.status is Status.FAIL
            and cert.detail.startswith("expired on")
            and cert.fix == "Renew the certificate"
        )


async def test_tls_wrong_name_and_untrusted_fail(certs: Certs) -> None:
    b = SmtpBehaviour(tls=certs.server_context(certs.wrong_name))
    async with SmtpListener(b) as lis:
        _, cert = await check_tls("127.0.0.1", lis.port, starttls=True, ca_file=certs.ca_file, timeout_s=10)
        assert cert.status is Status.FAIL and "other.example" in cert.fix
    b = SmtpBehaviour(tls=certs.server_context(certs.valid), implicit_tls=True)
    async with SmtpListener(b) as lis:
        _, cert = await check_tls("127.0.0.1", lis.port, starttls=False, ca_file=None, timeout_s=10)
        assert cert.status is Status.FAIL and "--ca-file" in cert.fix


async def test_tls_handshake_fails_on_plain_listener() -> None:
    async with SmtpListener(SmtpBehaviour()) as lis:
        (hs,) = await check_tls("127.0.0.1", lis.port, starttls=False, timeout_s=10)
        assert hs.status is Status.FAIL
        (st,) = await check_tls("127.0.0.1", lis.port, starttls=True, timeout_s=10)  # no TLS context: 502
        assert st.status is Status.FAIL and "STARTTLS refused" in st.detail


# --- SMTP / EHLO -----------------------------------------------------------------------------------------
async def test_ehlo_exchange_like_passes(certs: Certs) -> None:
    async with SmtpListener(SmtpBehaviour(tls=certs.server_context(certs.valid))) as lis:
        results = await check_ehlo(
            "127.0.0.1", lis.port, expect_auth=True, require_starttls=True, timeout_s=10
        )
        assert [r.status for r in results] == [Status.PASS] * 4, results
        assert "STARTTLS" in by_name(results, "EHLO").detail
        assert by_name(results, "AUTH after STARTTLS").detail == "AUTH LOGIN XOAUTH2 only after STARTTLS"


async def test_ehlo_warn_paths(certs: Certs) -> None:
    ctx = certs.server_context(certs.valid)
    early = SmtpBehaviour(tls=ctx, before_tls=("STARTTLS", "AUTH LOGIN PLAIN"))
    async with SmtpListener(early) as lis:
        r = by_name(
            await check_ehlo("127.0.0.1", lis.port, expect_auth=True, require_starttls=True, timeout_s=10),
            "AUTH",
        )
        assert r.status is Status.WARN and "before STARTTLS" in r.detail
    basic = SmtpBehaviour(tls=ctx, after_tls=("AUTH LOGIN",))
    async with SmtpListener(basic) as lis:
        r = by_name(
            await check_ehlo("127.0.0.1", lis.port, expect_auth=True, require_starttls=True, timeout_s=10),
            "AUTH",
        )
        assert r.status is Status.WARN and "no XOAUTH2" in r.detail
    mx = SmtpBehaviour(before_tls=("SIZE 1000",))
    async with SmtpListener(mx) as lis:
        r = by_name(
            await check_ehlo("127.0.0.1", lis.port, expect_auth=False, require_starttls=False, timeout_s=10),
            "STARTTLS",
        )
        assert r.status is Status.WARN


async def test_ehlo_fail_paths(certs: Certs) -> None:
    ctx = certs.server_context(certs.valid)
    async with SmtpListener(SmtpBehaviour(tls=ctx, after_tls=("SIZE 1000",))) as lis:
        r = by_name(
            await check_ehlo("127.0.0.1", lis.port, expect_auth=True, require_starttls=True, timeout_s=10),
            "AUTH",
        )
        assert r.status is Status.FAIL and "not offered" in r.detail
    async with SmtpListener(SmtpBehaviour(before_tls=("AUTH LOGIN",))) as lis:
        results = await check_ehlo(
            "127.0.0.1", lis.port, expect_auth=True, require_starttls=True, timeout_s=10
        )
        assert by_name(results, "STARTTLS").status is Status.FAIL
        assert by_name(results, "AUTH over TLS").status is Status.FAIL
    refusing = SmtpBehaviour(banner="554 5.7.1 Access denied, banned sending IP [127.0.0.1]")
    async with SmtpListener(refusing) as lis:
        (r,) = await check_ehlo(
            "127.0.0.1", lis.port, expect_auth=False, require_starttls=False, timeout_s=10
        )
        assert r.status is Status.FAIL and r.detail.startswith("554")
    async with SmtpListener(SmtpBehaviour(silent=True)) as lis:
        (r,) = await check_ehlo(
            "127.0.0.1", lis.port, expect_auth=False, require_starttls=False, timeout_s=0.5
        )
        assert r.status is Status.FAIL
    with closed_port() as port:
        (r,) = await check_ehlo("127.0.0.1", port, expect_auth=False, require_starttls=False, timeout_s=1)
        assert r.status is Status.FAIL


async def test_tls_incomplete_chain_fails_full_chain_passes(certs: Certs, tmp_path: Path) -> None:
    """A leaf from an intermediate CA, served without the intermediate: the chain cannot be built
    (the same mistake makes a certificate connector fail with 5.7.64)."""
    intermediate = certs.ca.create_child_ca()
    leaf = intermediate.issue_cert("127.0.0.1")
    key = tmp_path / "key.pem"
    leaf.private_key_pem.write_to_path(str(key))
    only_leaf = tmp_path / "leaf.pem"
    leaf.cert_chain_pems[0].write_to_path(str(only_leaf))
    full = tmp_path / "full.pem"
    full.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    for chain, expected in ((only_leaf, Status.FAIL), (full, Status.PASS)):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(chain), str(key))
        async with SmtpListener(SmtpBehaviour(tls=ctx, implicit_tls=True)) as lis:
            _, cert = await check_tls(
                "127.0.0.1", lis.port, starttls=False, ca_file=certs.ca_file, timeout_s=10
            )
        assert cert.status is expected, cert
        if expected is Status.FAIL:
            assert "full chain" in cert.fix and "issuer" in cert.detail
