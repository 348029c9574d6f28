"""SMTP checks: banner, EHLO capabilities, STARTTLS, and AUTH offered only after STARTTLS.

Exchange Online's submission endpoint advertises STARTTLS but no AUTH before TLS, and ``AUTH LOGIN
XOAUTH2`` after it (exchange-online.md). A server offering AUTH in clear text invites devices to send
passwords unencrypted.
"""

from __future__ import annotations

import ssl

from relay365.diagnostics.checks.result import CheckResult, failed, passed, warned
from relay365.diagnostics.checks.smtpwire import SmtpDialogError, SmtpProbe
from relay365.diagnostics.checks.tls import reading_context
from relay365.replies import classify

_ERRORS = (OSError, TimeoutError, ssl.SSLError, SmtpDialogError)


def _explain(code: int, text: str) -> str:
    entry = classify(f"{code} {text}")
    return entry.fix if entry is not None else "See the server's reply"


def _auth_mechanisms(caps: dict[str, str]) -> list[str]:
    return caps.get("AUTH", "").upper().split() if "AUTH" in caps else []


async def check_ehlo(
    host: str,
    port: int,
    *,
    expect_auth: bool,
    require_starttls: bool,
    server_name: str | None = None,
    timeout_s: float = 10.0,
) -> list[CheckResult]:
    """Banner and EHLO before and after STARTTLS. ``expect_auth`` for submission endpoints (587)."""
    where = f"{host}:{port}"
    results: list[CheckResult] = []
    try:
        async with SmtpProbe(host, port, timeout_s=timeout_s, server_name=server_name) as probe:
            banner = probe.banner
            assert banner is not None
            if banner.code != 220:
                return [
                    failed(
                        f"SMTP banner {where}",
                        f"{banner.code} {banner.text}",
                        _explain(banner.code, banner.text),
                    )
                ]
            results.append(passed(f"SMTP banner {where}", f"220 {banner.text}"))
            reply, caps = await probe.ehlo()
            if reply.code != 250:
                results.append(
                    failed(f"EHLO {where}", f"{reply.code} {reply.text}", _explain(reply.code, reply.text))
                )
                return results
            results.append(passed(f"EHLO {where}", " ".join(sorted(caps)) or "(no extensions)"))
            before = _auth_mechanisms(caps)
            if "STARTTLS" not in caps:
                status = failed if require_starttls else warned
                results.append(status(f"STARTTLS {where}", "not offered", "Enable STARTTLS on the server"))
                if before:
                    results.append(
                        failed(
                            f"AUTH over TLS {where}",
                            f"AUTH {' '.join(before)} offered without TLS",
                            "Enable TLS",
                        )
                    )
                return results
            results.append(passed(f"STARTTLS {where}", "offered"))
            tls_reply = await probe.starttls(reading_context())
            if tls_reply.code != 220:
                results.append(
                    failed(f"STARTTLS {where}", f"{tls_reply.code} {tls_reply.text}", "Fix the server's TLS")
                )
                return results
            reply, caps_tls = await probe.ehlo()
            after = _auth_mechanisms(caps_tls)
            results.append(_auth_result(where, before, after, expect_auth=expect_auth))
    except _ERRORS as exc:
        results.append(
            failed(f"SMTP {where}", str(exc) or exc.__class__.__name__, "Check host, port and firewall")
        )
    return results


def _auth_result(where: str, before: list[str], after: list[str], *, expect_auth: bool) -> CheckResult:
    name = f"AUTH after STARTTLS {where}"
    if before:
        return warned(
            name,
            f"AUTH {' '.join(before)} offered before STARTTLS",
            "Offer AUTH only after STARTTLS, as Exchange Online does, so passwords never travel in clear",
        )
    if not expect_auth:
        return passed(name, f"AUTH after TLS: {' '.join(after) or 'none'} (not needed here)")
    if not after:
        return failed(
            name, "AUTH not offered after STARTTLS", "Enable SMTP AUTH (Set-CASMailbox / Set-TransportConfig)"
        )
    if "XOAUTH2" not in after:
        return warned(
            name, f"AUTH {' '.join(after)}: no XOAUTH2", "OAuth (XOAUTH2) is needed once Basic auth is off"
        )
    return passed(name, f"AUTH {' '.join(after)} only after STARTTLS")
