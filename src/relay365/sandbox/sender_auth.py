"""Sender authentication at the MX endpoint, as Exchange Online Protection stamps it.

SPF (RFC 7208) is evaluated with pyspf for the MAIL FROM domain (the HELO name for the null sender,
RFC 7208 section 2.3) against the connecting IP *as Microsoft sees it* (``Tenant.public_ip``). The
sandbox has no DNS: TXT lookups are answered from the tenant file's ``[spf]`` table plus Microsoft's
own published record for ``spf.protection.outlook.com``; every other lookup is empty (a void lookup).

The verdict is written the way EOP writes it
(https://learn.microsoft.com/defender-office-365/message-headers-eop-mdo#authentication-results-message-header):

- ``Authentication-Results: spf=<pass|fail|softfail|neutral|none|temperror|permerror> (sender IP is
  <ip>) smtp.mailfrom=<domain>; dkim=none (message not signed) header.d=none;dmarc=<...> action=none
  header.from=<domain>;compauth=<pass|fail|none> reason=<nnn>`` (EOP writes no authserv-id);
- composite authentication (compauth), judged on the From: domain: it passes when SPF passes for a
  MAIL FROM domain aligned with From: (same domain or one below the other). Otherwise it fails
  *implicitly* (the sandbox has no DKIM or DMARC): reason ``6xx`` when the From: domain is one of the
  tenant's accepted domains (intra-org, "self-to-self" spoofing), ``001`` for any other domain
  (https://learn.microsoft.com/defender-office-365/anti-phishing-protection-spoofing-about#different-types-of-spoofing).
  A softfail (``~all``), ``?all`` and a missing record fail the same way: Microsoft lists SPF
  ``~all``/``?all`` and unpublished records as implicit failures (reason 001), and its device article
  warns that Direct Send without the device's IP in SPF may land in Junk Email;
- mail attributed to an inbound connector (OnPremises, by IP or certificate) is not judged for
  spoofing: ``compauth=none reason=405`` ("4xx: the message bypassed composite authentication"). That
  connector mail skips composite authentication is third-party observation (Exchange Tech Community,
  "Composite Authentication via on premise connectors"), not Microsoft documentation; SPF is still
  evaluated and stamped, because Microsoft's article asks for the connector's IP in SPF too.

The exact reason digits after ``6`` and ``4`` are internal to Microsoft; the sandbox uses 601 and 405.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import spf

if TYPE_CHECKING:
    from relay365.sandbox.tenant import Tenant

# Microsoft's published record (nslookup -type=txt spf.protection.outlook.com), so that the
# recommended "include:spf.protection.outlook.com" resolves without DNS.
# https://learn.microsoft.com/defender-office-365/email-authentication-spf-configure
MICROSOFT_SPF = (
    "v=spf1 ip4:40.92.0.0/15 ip4:40.107.0.0/16 ip4:52.100.0.0/15 ip4:52.102.0.0/16 ip4:52.103.0.0/16 "
    "ip4:104.47.0.0/17 ip6:2a01:111:f400::/48 ip6:2a01:111:f403::/49 ip6:2a01:111:f403:8000::/51 "
    "ip6:2a01:111:f403:c000::/51 ip6:2a01:111:f403:f000::/52 -all"
)
MICROSOFT_SPF_DOMAIN = "spf.protection.outlook.com"

COMPAUTH_PASS = "100"
COMPAUTH_INTRA_ORG = "601"
COMPAUTH_IMPLICIT = "001"
COMPAUTH_CONNECTOR = "405"
SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")


class _TenantQuery(spf.query):  # type: ignore[misc]
    """pyspf's query with every DNS lookup answered from the tenant file (no network)."""

    def __init__(self, *args: Any, records: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._records = records

    def dns(self, name: str, qtype: str, cnames: Any = None, ignore_void: bool = False) -> list[Any]:
        name = str(name).rstrip(".").lower()
        result: list[Any] = []
        if qtype == "TXT" and name in self._records:
            result = [(self._records[name].encode("ascii", "replace"),)]
        if not result and not ignore_void:
            self.void_lookups += 1  # RFC 7208 section 4.6.4, as pyspf counts them
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result


def evaluate_spf(tenant: Tenant, *, ip: str, mail_from: str, helo: str) -> tuple[str, str]:
    """``(result, domain)``: pyspf's verdict for ``ip`` sending as ``mail_from`` (or ``helo`` for <>)."""
    records = {MICROSOFT_SPF_DOMAIN: MICROSOFT_SPF, **dict(tenant.spf_records)}
    domain = mail_from.rpartition("@")[2].lower() if mail_from else helo.lower()
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return "permerror", domain
    query = _TenantQuery(i=ip, s=mail_from, h=helo or "unknown", records=records, querytime=0)
    result, _code, _explanation = query.check()
    verdict = str(result)
    return (verdict if verdict in SPF_RESULTS else "permerror"), domain


def _aligned(a: str, b: str) -> bool:
    return a == b or a.endswith("." + b) or b.endswith("." + a)


@dataclass(frozen=True)
class SenderVerdict:
    """What EOP concluded about the sender of one message."""

    spf: str
    ip: str
    mailfrom_domain: str
    from_domain: str
    compauth: str  # pass | fail | none
    reason: str

    @property
    def spoofed(self) -> bool:
        return self.compauth == "fail"

    @property
    def intra_org(self) -> bool:
        return self.reason == COMPAUTH_INTRA_ORG

    def authentication_results(self) -> str:
        """The ``Authentication-Results`` value EOP stamps."""
        return (
            f"spf={self.spf} (sender IP is {self.ip}) smtp.mailfrom={self.mailfrom_domain or 'none'}; "
            f"dkim=none (message not signed) header.d=none;dmarc=none action=none "
            f"header.from={self.from_domain or 'none'};compauth={self.compauth} reason={self.reason}"
        )


def judge_sender(
    tenant: Tenant, *, ip: str, mail_from: str, helo: str, header_from: str | None, connector: bool
) -> SenderVerdict:
    """SPF and composite authentication for a message received at the MX endpoint."""
    result, mailfrom_domain = evaluate_spf(tenant, ip=ip, mail_from=mail_from, helo=helo)
    from_domain = (header_from or mail_from).rpartition("@")[2].lower() or mailfrom_domain
    if connector:
        compauth, reason = "none", COMPAUTH_CONNECTOR
    elif result == "pass" and _aligned(mailfrom_domain, from_domain):
        compauth, reason = "pass", COMPAUTH_PASS
    elif tenant.is_accepted_domain(from_domain):
        compauth, reason = "fail", COMPAUTH_INTRA_ORG
    else:
        compauth, reason = "fail", COMPAUTH_IMPLICIT
    return SenderVerdict(
        spf=result,
        ip=ip,
        mailfrom_domain=mailfrom_domain,
        from_domain=from_domain,
        compauth=compauth,
        reason=reason,
    )
