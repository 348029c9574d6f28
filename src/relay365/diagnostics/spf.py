"""SPF for Direct Send and connector relay: the record Microsoft recommends, merged with what is published.

The seed article (options 2 and 3) recommends ``v=spf1 ip4:<static IP> include:spf.protection.outlook.com
~all``. An existing record is merged, never replaced: the IP and the include are added before the
``all``/``redirect`` and everything else is kept. Evaluation of "is this IP authorised" is done by
``pyspf`` (RFC 7208), not by a hand parser; :class:`_ResolverQuery` makes pyspf use the resolver we give
it (for example one pointed at the loopback DNS server) instead of the process-wide default resolver.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.resolver
import spf

log = logging.getLogger(__name__)

MICROSOFT_INCLUDE = "include:spf.protection.outlook.com"
MAX_LOOKUPS = 10  # RFC 7208 section 4.6.4
_LOOKUP_MECHS = ("include", "a", "mx", "ptr", "exists")


def recommended_record(ip: str) -> str:
    """The record the article recommends for one static IP (``ip6:`` for an IPv6 address)."""
    return f"v=spf1 {ip_term(ip)} {MICROSOFT_INCLUDE} ~all"


def ip_term(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    return f"ip{addr.version}:{addr}"


def is_spf(txt: str) -> bool:
    """RFC 7208 section 4.5: a record starts with ``v=spf1`` followed by a space or the end."""
    low = txt.strip().lower()
    return low == "v=spf1" or low.startswith("v=spf1 ")


def _mechanism(term: str) -> tuple[str, str, str]:
    """(qualifier, name, argument) of a term; modifiers come back as ("", "redirect=", value)."""
    qualifier = term[0] if term[:1] in "+-~?" else ""
    body = term[len(qualifier) :]
    if "=" in body and (":" not in body or body.index("=") < body.index(":")):
        name, _, value = body.partition("=")
        return "", name.lower() + "=", value
    name, sep, arg = body.partition(":")
    if not sep:
        name, _, arg = body.partition("/")
        arg = "/" + arg if arg else ""
    return qualifier, name.lower(), arg


def _covers(term: str, ip: str) -> bool:
    qualifier, name, arg = _mechanism(term)
    if qualifier not in ("", "+") or name not in ("ip4", "ip6"):
        return False
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(arg, strict=False)
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class MergeResult:
    record: str
    changed: bool
    added: tuple[str, ...]
    warnings: tuple[str, ...]


def static_warnings(record: str) -> list[str]:
    """Problems visible in the record itself (no DNS needed)."""
    warnings: list[str] = []
    terms = record.split()[1:]
    mechs = [_mechanism(t) for t in terms]
    for qualifier, name, _ in mechs:
        if name == "all" and qualifier in ("", "+"):
            warnings.append(
                "'+all' authorises every host on the internet to send as this domain: use ~all or -all"
            )
        if name == "ptr":
            warnings.append("'ptr' is slow and discouraged (RFC 7208 section 5.5): use ip4:/ip6: instead")
    if MICROSOFT_INCLUDE not in (t.lower().lstrip("+") for t in terms):
        warnings.append(f"missing {MICROSOFT_INCLUDE}: mail sent by Exchange Online may fail SPF")
    if not any(name in ("all", "redirect=") for _, name, _ in mechs):
        warnings.append("no 'all' and no 'redirect=': the default result is neutral; end with ~all")
    return warnings


def merge(existing: str | None, ip: str) -> MergeResult:
    """Add ``ip`` and Microsoft's include to ``existing`` (or build the recommended record)."""
    if existing is None or not is_spf(existing):
        record = recommended_record(ip)
        return MergeResult(record, True, tuple(record.split()[1:]), ())
    terms = existing.split()[1:]
    added: list[str] = []
    front: list[str] = []
    if not any(_covers(t, ip) for t in terms):
        front.append(ip_term(ip))  # first: matched without any DNS lookup
    back: list[str] = []
    if MICROSOFT_INCLUDE not in (t.lower().lstrip("+") for t in terms):
        back.append(MICROSOFT_INCLUDE)
    # The include goes before the first 'all' or 'redirect=' (terms after 'all' are never evaluated).
    cut = next(
        (i for i, t in enumerate(terms) if _mechanism(t)[1] in ("all", "redirect=")),
        len(terms),
    )
    merged = front + terms[:cut] + back + terms[cut:]
    added.extend(front + back)
    if not any(_mechanism(t)[1] in ("all", "redirect=") for t in merged):
        merged.append("~all")
        added.append("~all")
    record = " ".join(["v=spf1", *merged])
    return MergeResult(record, bool(added), tuple(added), tuple(static_warnings(record)))


def fetch_spf_records(domain: str, resolver: dns.resolver.Resolver) -> list[str]:
    """The SPF records published at ``domain`` (TXT records starting ``v=spf1``).

    Raises dns.resolver.NXDOMAIN, dns.resolver.NoNameservers (SERVFAIL) and dns.exception.Timeout.
    """
    try:
        answer = resolver.resolve(domain, "TXT")
    except dns.resolver.NoAnswer:
        return []
    texts = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
    return [t for t in texts if is_spf(t)]


@dataclass(frozen=True, slots=True)
class LookupCount:
    count: int
    unresolved: tuple[str, ...] = field(default=())


def count_lookups(record: str, resolver: dns.resolver.Resolver, *, _depth: int = 0) -> LookupCount:
    """DNS-querying terms of ``record`` including nested includes/redirects (RFC 7208 section 4.6.4)."""
    count = 0
    unresolved: list[str] = []
    for term in record.split()[1:]:
        _, name, arg = _mechanism(term)
        if name in _LOOKUP_MECHS or name == "redirect=":
            count += 1
            if name in ("include", "redirect=") and arg and _depth < 10:
                try:
                    nested = fetch_spf_records(arg, resolver)
                except dns.exception.DNSException:
                    unresolved.append(arg)
                    continue
                if nested:
                    inner = count_lookups(nested[0], resolver, _depth=_depth + 1)
                    count += inner.count
                    unresolved.extend(inner.unresolved)
                else:
                    unresolved.append(arg)
    return LookupCount(count, tuple(unresolved))


class _ResolverQuery(spf.query):  # type: ignore[misc]
    """pyspf's query with its DNS lookups sent through one given dnspython resolver.

    pyspf calls the module-level ``spf.DNSLookup`` (which uses dnspython's process-wide default
    resolver). Overriding :meth:`dns` keeps the resolver local to this evaluation: no global state is
    changed, so parallel checks against different servers do not interfere. Caching and the void-lookup
    limit (RFC 7208 section 4.6.4) are kept as pyspf does them.
    """

    def __init__(self, *args: Any, resolver: dns.resolver.Resolver, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resolver = resolver

    def dns(self, name: str, qtype: str, cnames: Any = None, ignore_void: bool = False) -> list[Any]:
        name = str(name).rstrip(".").lower()
        if not name or not all(0 < len(label) < 64 for label in name.split(".")):
            return []
        key = (name, qtype)
        if key in self.cache:
            return list(self.cache[key])
        result: list[Any] = []
        try:
            for rdata in self._resolver.resolve(name, qtype):
                if qtype in ("A", "AAAA"):
                    result.append(rdata.address)
                elif qtype == "MX":
                    result.append((rdata.preference, rdata.exchange))
                elif qtype == "PTR":
                    result.append(rdata.target.to_text(True))
                elif qtype in ("TXT", "SPF"):
                    result.append(rdata.strings)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            pass
        except dns.exception.DNSException as exc:
            raise spf.TempError(f"DNS {exc}") from exc
        self.cache[key] = result
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result


@dataclass(frozen=True, slots=True)
class Evaluation:
    result: str  # pass | fail | softfail | neutral | none | permerror | temperror
    explanation: str


def evaluate(
    ip: str, sender: str, resolver: dns.resolver.Resolver, *, helo: str = "relay365.invalid"
) -> Evaluation:
    """Evaluate SPF for mail from ``sender`` sent by ``ip`` with pyspf (blocking: use a thread in async)."""
    query = _ResolverQuery(i=ip, s=sender, h=helo, resolver=resolver, querytime=20)
    result, _code, explanation = query.check()
    return Evaluation(str(result), str(explanation))


@dataclass(frozen=True, slots=True)
class SpfReport:
    """What ``relay365 spf`` prints."""

    ip: str
    domain: str | None
    recommended: str
    existing: tuple[str, ...]
    proposed: str
    added: tuple[str, ...]
    warnings: tuple[str, ...]
    lookups: int | None
    current_result: str | None  # pyspf's verdict on the published record for this IP

    def to_dict(self) -> dict[str, Any]:
        return {
            "ip": self.ip,
            "domain": self.domain,
            "recommended": self.recommended,
            "existing": list(self.existing),
            "proposed": self.proposed,
            "added": list(self.added),
            "warnings": list(self.warnings),
            "lookups": self.lookups,
            "current_result": self.current_result,
        }


def build_report(ip: str, domain: str | None, resolver: dns.resolver.Resolver | None) -> SpfReport:
    """The recommended record, and with a domain: the merge with its published record and warnings."""
    ipaddress.ip_address(ip)  # ValueError for a bad address
    recommended = recommended_record(ip)
    if domain is None or resolver is None:
        return SpfReport(ip, None, recommended, (), recommended, (), (), None, None)
    warnings: list[str] = []
    try:
        existing = fetch_spf_records(domain, resolver)
    except dns.resolver.NXDOMAIN:
        existing = []
        warnings.append(f"{domain} does not exist in DNS (NXDOMAIN)")
    except dns.exception.DNSException as exc:
        existing = []
        warnings.append(f"could not read the TXT records of {domain}: {exc.__class__.__name__}")
    if len(existing) > 1:
        warnings.append(
            f"{len(existing)} SPF records published: receivers return permerror (RFC 7208 section 4.5); "
            "merge them into one"
        )
    merged = merge(existing[0] if existing else None, ip)
    warnings.extend(merged.warnings)
    lookups = count_lookups(merged.record, resolver)
    if lookups.count > MAX_LOOKUPS:
        warnings.append(f"{lookups.count} DNS lookups: over the limit of {MAX_LOOKUPS} (permerror)")
    current = evaluate(ip, f"postmaster@{domain}", resolver).result if existing else "none"
    return SpfReport(
        ip, domain, recommended, tuple(existing), merged.record, merged.added, tuple(warnings),
        lookups.count, current,
    )  # fmt: skip
