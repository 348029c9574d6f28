"""``relay365 doctor``: run the checks for a configuration and collect pass / warn / fail with fixes.

Library entry point: :func:`run_doctor` with :class:`DoctorOptions` (checks given by flags). The checks
derived from a relay365.toml (relay, transports, auth, --send-test) are in :mod:`.doctor_config`; both
return :class:`~.checks.CheckResult` rows and share :func:`render` and :func:`worst`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, replace

import dns.asyncresolver
import dns.exception
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from relay365.diagnostics.checks import CheckResult, Status
from relay365.diagnostics.checks.dns import check_mx, is_microsoft_mx
from relay365.diagnostics.checks.network import check_tcp
from relay365.diagnostics.checks.smtp import check_ehlo
from relay365.diagnostics.checks.spf_check import check_spf
from relay365.diagnostics.checks.tls import check_tls
from relay365.netdns import make_async_resolver, make_resolver

log = logging.getLogger(__name__)

IMPLICIT_TLS_PORTS = (465,)


@dataclass(frozen=True, slots=True, kw_only=True)
class DoctorOptions:
    domains: tuple[str, ...] = ()
    public_ip: str | None = None
    nameserver: str | None = None
    smtp_host: str | None = None  # submission endpoint (smtp.office365.com, or the sandbox)
    smtp_port: int = 587
    smtp_server_name: str | None = None  # TLS name to verify when smtp_host is an address
    mx_host: str | None = None  # Direct Send / connector endpoint
    mx_port: int = 25
    mx_server_name: str | None = None
    ca_file: str | None = None
    timeout_s: float = 5.0
    probe_mx: bool = False  # also connect to each domain's MX endpoint (address from --nameserver) on mx_port


async def _endpoint(
    host: str, port: int, *, submission: bool, opts: DoctorOptions, server_name: str | None
) -> list[CheckResult]:
    reach = await check_tcp(host, port, timeout_s=opts.timeout_s)
    if reach.status is Status.FAIL:
        return [reach]
    implicit = port in IMPLICIT_TLS_PORTS
    tls = await check_tls(
        host,
        port,
        starttls=not implicit,
        server_name=server_name,
        ca_file=opts.ca_file,
        timeout_s=opts.timeout_s,
    )
    if not submission:
        # Direct Send takes opportunistic TLS (seed article: TLS optional), so a TLS problem on the MX
        # endpoint is a warning; a certificate connector needs it (exchange-online.md).
        tls = [_soften(r) for r in tls]
    results = [reach, *tls]
    if not implicit:
        results += await check_ehlo(
            host,
            port,
            expect_auth=submission,
            require_starttls=submission,
            server_name=server_name,
            timeout_s=opts.timeout_s,
        )
    return results


async def _probe_mx(
    domain: str, resolver: dns.asyncresolver.Resolver, opts: DoctorOptions
) -> list[CheckResult]:
    """Connect to the MX endpoint of ``domain`` at the address *our* resolver gives (so a loopback
    nameserver can point it at a local listener), verifying TLS against the MX host name."""
    try:
        answer = await resolver.resolve(domain, "MX")
        hosts = sorted((r.preference, r.exchange.to_text().rstrip(".")) for r in answer)
        host = next((h for _, h in hosts if is_microsoft_mx(h)), hosts[0][1])
        address = next(iter(await resolver.resolve(host, "A"))).address
    except dns.exception.DNSException:
        return []  # check_mx already reports why
    results = await _endpoint(address, opts.mx_port, submission=False, opts=opts, server_name=host)
    return [replace(r, name=f"{r.name} ({host})") for r in results]


async def run_doctor(opts: DoctorOptions) -> list[CheckResult]:
    """All checks that the options allow, concurrently; results in a stable order."""
    jobs: list[Awaitable[list[CheckResult]]] = []
    if opts.domains:
        aresolver = make_async_resolver(opts.nameserver, timeout=opts.timeout_s)
        resolver = make_resolver(opts.nameserver, timeout=opts.timeout_s)
        for domain in opts.domains:
            jobs.append(check_mx(domain, aresolver))
            jobs.append(check_spf(domain, resolver, public_ip=opts.public_ip))
            if opts.probe_mx:
                jobs.append(_probe_mx(domain, aresolver, opts))
    if opts.smtp_host:
        jobs.append(
            _endpoint(
                opts.smtp_host, opts.smtp_port, submission=True, opts=opts, server_name=opts.smtp_server_name
            )
        )
    if opts.mx_host:
        jobs.append(
            _endpoint(
                opts.mx_host, opts.mx_port, submission=False, opts=opts, server_name=opts.mx_server_name
            )
        )
    batches = await asyncio.gather(*jobs)
    results = [r for batch in batches for r in batch]
    for r in results:
        log.info("doctor %s: %s (%s)", r.status.value, r.name, r.detail)
    return results


def _soften(result: CheckResult) -> CheckResult:
    if result.status is not Status.FAIL:
        return result
    fix = f"{result.fix} (TLS is optional for Direct Send, required for a certificate-based connector)"
    return replace(result, status=Status.WARN, fix=fix.strip())


def worst(results: Sequence[CheckResult]) -> Status:
    statuses = {r.status for r in results}
    if Status.FAIL in statuses:
        return Status.FAIL
    return Status.WARN if Status.WARN in statuses else Status.PASS


_STYLE = {Status.PASS: "green", Status.WARN: "yellow", Status.FAIL: "bold red"}


def render(results: Sequence[CheckResult], console: Console) -> None:
    table = Table(title="relay365 doctor")
    table.add_column("Status", no_wrap=True)
    table.add_column("Check", overflow="fold")
    table.add_column("Detail", overflow="fold")
    table.add_column("Fix", overflow="fold")
    for r in results:
        style = _STYLE[r.status]
        table.add_row(f"[{style}]{r.status.value}[/]", escape(r.name), escape(r.detail), escape(r.fix))
    console.print(table)
    counts = {s: sum(1 for r in results if r.status is s) for s in Status}
    console.print(f"{counts[Status.PASS]} pass, {counts[Status.WARN]} warn, {counts[Status.FAIL]} fail")
