"""``relay365 doctor`` end to end: DNS server, TLS/SMTP listeners and a closed port on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from relay365.cli import app
from relay365.diagnostics.checks import Status
from relay365.diagnostics.dnsserver import DnsServer, ThreadedDnsServer
from relay365.diagnostics.doctor import DoctorOptions, run_doctor, worst

from .peers import Certs, LoopThread, SmtpBehaviour, SmtpListener, closed_port

INC = "include:spf.protection.outlook.com"
ZONE = {
    "spf.protection.outlook.com": {"TXT": ["v=spf1 ip4:40.92.0.0/15 -all"]},
    "contoso.test": {
        "MX": [(0, "contoso-test.mail.protection.outlook.com")],
        "TXT": [f"v=spf1 ip4:203.0.113.5 {INC} ~all"],
    },
    "contoso-test.mail.protection.outlook.com": {"A": ["127.0.0.1"]},
    "fabrikam.test": {"TXT": ["v=spf1 -all", "v=spf1 ~all"]},
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(Path(tmp_path_factory.mktemp("certs")))


async def test_run_doctor_healthy(certs: Certs) -> None:
    ctx = certs.server_context(certs.valid)
    async with (
        DnsServer(ZONE) as dns_srv,
        SmtpListener(SmtpBehaviour(tls=ctx)) as sub,
        SmtpListener(SmtpBehaviour(tls=ctx, after_tls=("SIZE 1000",))) as mx,
    ):
        opts = DoctorOptions(
            domains=("contoso.test",), public_ip="203.0.113.5", nameserver=dns_srv.nameserver,
            smtp_host="127.0.0.1", smtp_port=sub.port, mx_host="127.0.0.1", mx_port=mx.port,
            ca_file=certs.ca_file, timeout_s=10,
        )  # fmt: skip
        results = await run_doctor(opts)
    assert worst(results) is Status.PASS, [r for r in results if r.status is not Status.PASS]
    names = [r.name for r in results]
    assert names[0] == "MX contoso.test"
    assert f"TLS certificate 127.0.0.1:{sub.port}" in names
    assert f"AUTH after STARTTLS 127.0.0.1:{mx.port}" in names
    assert len(results) >= 20


async def test_run_doctor_failures(certs: Certs) -> None:
    async with (
        DnsServer(ZONE) as dns_srv,
        SmtpListener(SmtpBehaviour(tls=certs.server_context(certs.expired))) as sub,
    ):
        with closed_port() as port:
            opts = DoctorOptions(
                domains=("fabrikam.test",),
                nameserver=dns_srv.nameserver,
                smtp_host="127.0.0.1",
                smtp_port=sub.port,
                mx_host="127.0.0.1",
                mx_port=port,
                ca_file=certs.ca_file,
                timeout_s=10,
            )
            results = await run_doctor(opts)
    failing = {r.name for r in results if r.status is Status.FAIL}
    assert "MX fabrikam.test" in failing
    assert "SPF single record fabrikam.test" in failing
    assert f"TLS certificate 127.0.0.1:{sub.port}" in failing
    assert f"TCP 127.0.0.1:{port}" in failing
    # A closed port stops the endpoint's other checks.
    assert not any(r.name.endswith(f":{port}") and not r.name.startswith("TCP") for r in results)


def test_cli_doctor_json_and_table(certs: Certs) -> None:
    with ThreadedDnsServer(ZONE) as dns_srv, LoopThread() as lt:
        lis = SmtpListener(SmtpBehaviour(tls=certs.server_context(certs.valid)))
        lt.run(lis.__aenter__())
        try:
            args = ["doctor", "--domain", "contoso.test", "--public-ip", "203.0.113.5", "--nameserver",
                    dns_srv.nameserver, "--smtp-host", "127.0.0.1", "--smtp-port", str(lis.port),
                    "--ca-file", certs.ca_file, "--timeout", "10"]  # fmt: skip
            result = CliRunner().invoke(app, [*args, "--json"])
            assert result.exit_code == 0, result.output
            data = json.loads(result.output)
            assert data["status"] == "pass"
            assert {c["status"] for c in data["checks"]} == {"pass"}
            table = CliRunner().invoke(app, args)
            assert table.exit_code == 0
            assert "relay365 doctor" in table.output and "0 fail" in table.output
            failing = CliRunner().invoke(
                app, ["doctor", "--domain", "fabrikam.test", "--nameserver", dns_srv.nameserver]
            )
            assert failing.exit_code == 1
            assert "1 pass, 0 warn, 2 fail" in failing.output
        finally:
            lt.run(lis.__aexit__(None, None, None))
    nothing = CliRunner().invoke(app, ["doctor"])
    assert nothing.exit_code == 2


async def test_tls_problem_on_mx_endpoint_is_a_warning(certs: Certs) -> None:
    """Direct Send takes opportunistic TLS: an expired certificate on the MX endpoint warns, on the
    submission endpoint it fails."""
    expired = SmtpBehaviour(tls=certs.server_context(certs.expired), after_tls=("SIZE 1000",))
    async with (
        SmtpListener(expired) as mx,
        SmtpListener(SmtpBehaviour(tls=certs.server_context(certs.expired))) as sub,
    ):
        results = await run_doctor(
            DoctorOptions(
                smtp_host="127.0.0.1",
                smtp_port=sub.port,
                mx_host="127.0.0.1",
                mx_port=mx.port,
                ca_file=certs.ca_file,
                timeout_s=10,
            )
        )
    status = {r.name: r.status for r in results}
    assert status[f"TLS certificate 127.0.0.1:{mx.port}"] is Status.WARN
    assert status[f"TLS certificate 127.0.0.1:{sub.port}"] is Status.FAIL
    assert worst(results) is Status.FAIL


async def test_probe_mx_uses_the_configured_resolver(certs: Certs) -> None:
    """--probe-mx connects to the MX endpoint at the address the loopback DNS server gives and verifies
    TLS against the MX host name."""
    host = "contoso-test.mail.protection.outlook.com"
    mx_cert = certs.ca.issue_cert(host)
    behaviour = SmtpBehaviour(tls=certs.server_context(mx_cert), after_tls=("SIZE 157286400",))
    async with DnsServer(ZONE) as dns_srv, SmtpListener(behaviour) as mx:
        results = await run_doctor(
            DoctorOptions(
                domains=("contoso.test",),
                nameserver=dns_srv.nameserver,
                mx_port=mx.port,
                probe_mx=True,
                ca_file=certs.ca_file,
                timeout_s=10,
            )
        )
    probed = [r for r in results if r.name.endswith(f"({host})")]
    assert {r.name.split(" 127.0.0.1")[0] for r in probed} >= {
        "TCP",
        "TLS handshake",
        "TLS certificate",
        "EHLO",
    }
    assert all(r.status is Status.PASS for r in probed), probed
    assert f"valid for {host}" in next(r.detail for r in probed if r.name.startswith("TLS certificate"))
