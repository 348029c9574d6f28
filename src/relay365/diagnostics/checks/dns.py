"""DNS checks: the MX record of an accepted domain and its Exchange Online endpoint."""

from __future__ import annotations

import dns.asyncresolver
import dns.exception
import dns.resolver

from relay365.diagnostics.checks.result import CheckResult, failed, passed, warned
from relay365.diagnostics.endpoints import mx_endpoint

# Exchange Online MX hosts: classic, and the DNSSEC-enabled endpoints (2024+).
MICROSOFT_MX_SUFFIXES = (".mail.protection.outlook.com", ".mx.microsoft")


def is_microsoft_mx(host: str) -> bool:
    return host.lower().rstrip(".").endswith(MICROSOFT_MX_SUFFIXES)


def dns_error(exc: dns.exception.DNSException) -> str:
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return "the domain does not exist (NXDOMAIN)"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "the DNS server failed to answer (SERVFAIL)"
    if isinstance(exc, dns.exception.Timeout):
        return "the DNS query timed out"
    return f"DNS error: {exc.__class__.__name__}"


async def check_mx(domain: str, resolver: dns.asyncresolver.Resolver) -> list[CheckResult]:
    """MX of ``domain`` -> its Exchange Online endpoint, and that the endpoint resolves."""
    name = f"MX {domain}"
    expected = mx_endpoint(domain)
    try:
        answer = await resolver.resolve(domain, "MX")
    except dns.resolver.NoAnswer:
        return [
            failed(name, "no MX record", f"Add MX 0 {expected} (value from the Microsoft 365 admin center)")
        ]
    except dns.exception.DNSException as exc:
        return [failed(name, dns_error(exc), "Check the domain's DNS hosting and the --nameserver")]
    hosts = sorted((r.preference, r.exchange.to_text().rstrip(".").lower()) for r in answer)
    best = hosts[0][1]
    listed = ", ".join(f"{p} {h}" for p, h in hosts)
    results: list[CheckResult] = []
    if is_microsoft_mx(best):
        detail = f"{listed}: Exchange Online"
        if best != expected and best.endswith(".mail.protection.outlook.com"):
            detail += f" (not the usual {expected}; use the MX value as the smart host)"
        results.append(passed(name, detail))
    elif any(is_microsoft_mx(h) for _, h in hosts):
        results.append(
            warned(name, f"{listed}: Exchange Online is not the preferred MX", "Put the tenant's MX first")
        )
    else:
        results.append(
            warned(
                name,
                f"{listed}: mail goes through another gateway first",
                f"Direct Send and connector routes must use the tenant endpoint {expected}, not this MX",
            )
        )
    endpoint = best if is_microsoft_mx(best) else expected
    results.append(await check_endpoint(endpoint, resolver))
    return results


async def check_endpoint(host: str, resolver: dns.asyncresolver.Resolver) -> CheckResult:
    """The MX endpoint resolves to an address (the smart host the device or relay365 connects to)."""
    name = f"MX endpoint {host}"
    try:
        answer = await resolver.resolve(host, "A")
    except dns.exception.DNSException as exc:
        return failed(
            name,
            dns_error(exc),
            "Use the exact MX 'points to' value from the Microsoft 365 admin center (Settings > Domains)",
        )
    return passed(name, "resolves to " + ", ".join(sorted(r.address for r in answer)))
