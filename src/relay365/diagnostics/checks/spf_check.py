"""SPF checks for an accepted domain: present, one record, valid, under 10 lookups, Microsoft's include,
the relay's public IP authorised (evaluated by pyspf), and ~all versus -all advice."""

from __future__ import annotations

import asyncio

import dns.exception
import dns.resolver

from relay365.diagnostics import spf
from relay365.diagnostics.checks.dns import dns_error
from relay365.diagnostics.checks.result import CheckResult, failed, passed, warned

_VALIDATION_IP = "192.0.2.1"  # RFC 5737 documentation address: only used to make pyspf parse the record


def _all_qualifier(record: str) -> str | None:
    for term in record.split()[1:]:
        body = term.lstrip("+-~?").lower()
        if body == "all":
            return term[0] if term[0] in "+-~?" else "+"
    return None


async def check_spf(
    domain: str, resolver: dns.resolver.Resolver, *, public_ip: str | None
) -> list[CheckResult]:
    """All SPF checks of ``domain``; ``public_ip`` is the address relay365 (or the device) sends from."""
    name = f"SPF {domain}"
    try:
        records = await asyncio.to_thread(spf.fetch_spf_records, domain, resolver)
    except dns.exception.DNSException as exc:
        return [failed(name, dns_error(exc), "Check the domain's DNS hosting and the --nameserver")]
    proposed = spf.recommended_record(public_ip) if public_ip else f"v=spf1 {spf.MICROSOFT_INCLUDE} -all"
    if not records:
        return [
            failed(name, "no SPF record", f"Publish TXT {proposed!r} (relay365 spf --ip ... --domain ...)")
        ]
    results = [passed(name, records[0] if len(records) == 1 else f"{len(records)} records")]
    if len(records) > 1:
        results.append(
            failed(
                f"SPF single record {domain}",
                f"{len(records)} SPF records: receivers return permerror (RFC 7208 section 4.5)",
                "Merge them into one record",
            )
        )
        return results
    record = records[0]
    results.append(passed(f"SPF single record {domain}", "one record"))
    verdict = await asyncio.to_thread(spf.evaluate, _VALIDATION_IP, f"postmaster@{domain}", resolver)
    if verdict.result == "permerror":
        results.append(
            failed(f"SPF valid {domain}", f"permerror: {verdict.explanation}", "Fix the record syntax")
        )
    else:
        results.append(passed(f"SPF valid {domain}", "pyspf parses and evaluates the record"))
    count = await asyncio.to_thread(spf.count_lookups, record, resolver)
    lookups = f"{count.count} DNS lookups (limit {spf.MAX_LOOKUPS})"
    if count.unresolved:
        lookups += "; could not read " + ", ".join(count.unresolved)
    if count.count > spf.MAX_LOOKUPS:
        results.append(failed(f"SPF lookups {domain}", lookups, "Replace include:/a/mx terms with ip4:/ip6:"))
    elif count.count >= spf.MAX_LOOKUPS - 1:
        results.append(
            warned(f"SPF lookups {domain}", lookups, "Close to the limit: flatten before adding more")
        )
    else:
        results.append(passed(f"SPF lookups {domain}", lookups))
    if spf.MICROSOFT_INCLUDE in (t.lower().lstrip("+") for t in record.split()):
        results.append(passed(f"SPF Microsoft include {domain}", spf.MICROSOFT_INCLUDE))
    else:
        results.append(
            failed(
                f"SPF Microsoft include {domain}",
                f"{spf.MICROSOFT_INCLUDE} missing: Exchange Online's own mail fails SPF",
                f"Publish {spf.merge(record, public_ip).record!r}"
                if public_ip
                else f"Add {spf.MICROSOFT_INCLUDE}",
            )
        )
    if public_ip:
        results.append(await _check_ip(domain, public_ip, record, resolver))
    results.append(_all_advice(domain, record))
    return results


async def _check_ip(domain: str, ip: str, record: str, resolver: dns.resolver.Resolver) -> CheckResult:
    name = f"SPF authorises {ip}"
    verdict = await asyncio.to_thread(spf.evaluate, ip, f"postmaster@{domain}", resolver)
    merged = spf.merge(record, ip).record
    if verdict.result == "pass":
        return passed(name, f"pass for {domain}")
    if verdict.result in ("softfail", "neutral", "temperror"):
        return warned(name, f"{verdict.result}: {verdict.explanation}", f"Publish {merged!r}")
    return failed(name, f"{verdict.result}: {verdict.explanation}", f"Publish {merged!r}")


def _all_advice(domain: str, record: str) -> CheckResult:
    name = f"SPF all {domain}"
    qualifier = _all_qualifier(record)
    if qualifier == "+":
        return failed(name, "+all authorises every host on the internet", "Use ~all (or -all)")
    if qualifier == "~":
        return passed(
            name,
            "~all (softfail): what Microsoft's device article recommends",
            "Move to -all once every sender of the domain is listed",
        )
    if qualifier == "-":
        return passed(name, "-all (fail): strict; every sender must be listed", "")
    if qualifier == "?":
        return warned(name, "?all (neutral) gives no protection", "Use ~all")
    return warned(name, "no all term: unlisted senders get neutral", "End the record with ~all")
