"""``relay365 doctor --config relay365.toml``: every check derived from a real relay configuration.

Order of the report: relay365 itself (config, listener certificates, spool, queue), then per transport
its network reach and TLS, then auth (token, XOAUTH2 or the Graph probe), then whether Microsoft 365's
message trace can be read (``[tracing]``), then the optional test message. Checks of different
transports run concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from relay365.diagnostics.checks.auth import (
    check_graph,
    check_send_as_graph,
    check_send_as_smtp,
    check_token,
    check_xoauth2,
)
from relay365.diagnostics.checks.client_cert import check_client_certificate
from relay365.diagnostics.checks.dns import check_mx
from relay365.diagnostics.checks.network import check_tcp
from relay365.diagnostics.checks.relaycfg import (
    SPOOL_FAIL_BYTES,
    SPOOL_WARN_BYTES,
    check_config,
    check_listener_cert,
    check_postgres,
    check_queue,
    check_spool_dir,
)
from relay365.diagnostics.checks.result import CheckResult, Status, failed, passed, warned
from relay365.diagnostics.checks.smtp import check_ehlo
from relay365.diagnostics.checks.spf_check import check_spf
from relay365.diagnostics.checks.tls import _certificate_result, check_tls, verifying_context
from relay365.diagnostics.checks.trace_check import check_message_trace
from relay365.diagnostics.doctor import _soften
from relay365.diagnostics.sendas import SendAsRisk, send_as_risks
from relay365.diagnostics.sendcheck import SendTestOptions, send_test_checks
from relay365.netdns import make_async_resolver, make_resolver
from relay365.settings import Settings, TransportSettings

OAUTH_TYPES = ("submission", "graph")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigDoctorOptions:
    config: Path
    timeout_s: float = 10.0
    send_test: SendTestOptions | None = None
    spool_warn_bytes: int = SPOOL_WARN_BYTES
    spool_fail_bytes: int = SPOOL_FAIL_BYTES
    now: dt.datetime | None = None
    # DNS (MX, SPF) of the accepted domains of direct_send/connector transports, with each transport's
    # own ``nameservers`` if set, else ``nameserver``, else the system's resolver.
    check_dns: bool = False
    nameserver: str | None = None
    public_ip: str | None = None


async def _https_tls(host: str, port: int, ca_file: str | None, timeout_s: float) -> list[CheckResult]:
    """TLS handshake and certificate of an HTTPS endpoint (Graph, the token authority)."""
    where = f"{host}:{port}"
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=verifying_context(ca_file), server_hostname=host),
            timeout_s,
        )
    except ssl.SSLCertVerificationError as exc:
        msg = exc.verify_message or str(exc)
        return [failed(f"TLS handshake {where}", msg, "Use a CA the relay trusts (ca_file: private CA)")]
    except (ssl.SSLError, OSError, TimeoutError) as exc:
        return [failed(f"TLS handshake {where}", str(exc) or type(exc).__name__, "Check host and port")]
    obj = writer.get_extra_info("ssl_object")
    version, cipher, der = "?", "?", b""
    if isinstance(obj, ssl.SSLObject):
        version = obj.version() or "?"
        cipher = (obj.cipher() or ("?",))[0]
        der = obj.getpeercert(binary_form=True) or b""
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der) if der else None
    now = dt.datetime.now(dt.UTC)
    return [
        passed(f"TLS handshake {where}", f"{version}, {cipher}"),
        _certificate_result(where, host, cert, None, now),
    ]


async def transport_network(t: TransportSettings, *, timeout_s: float) -> list[CheckResult]:
    """Reach and TLS of one transport's upstream (MX-derived hosts are checked with --domain)."""
    label = f"[{t.name}] "
    ca = str(t.ca_file) if t.ca_file else None
    if t.type == "graph":
        url = urlsplit(t.m365.graph_url)
        host, port = url.hostname or "", url.port or 443
        reach = await check_tcp(host, port, timeout_s=timeout_s)
        results = [reach]
        if reach.status is not Status.FAIL:
            results += await _https_tls(host, port, ca, timeout_s)
    elif not t.host:
        return [
            passed(
                f"{label}upstream",
                "the MX endpoint of each recipient domain (checked by 'doctor --domain D --probe-mx')",
            )
        ]
    else:
        reach = await check_tcp(t.host, t.port, timeout_s=timeout_s)
        results = [reach]
        if reach.status is not Status.FAIL:
            implicit = t.tls == "implicit"
            if t.tls != "none":
                tls = await check_tls(t.host, t.port, starttls=not implicit, ca_file=ca, timeout_s=timeout_s)
                results += [_soften(r) for r in tls] if t.tls == "opportunistic" else tls
            if not implicit:
                results += await check_ehlo(
                    t.host,
                    t.port,
                    expect_auth=t.type == "submission",
                    require_starttls=t.tls == "required",
                    timeout_s=timeout_s,
                )
    return [replace(r, name=label + r.name) for r in results]


async def transport_auth(
    t: TransportSettings, *, timeout_s: float, send_as: tuple[str, ...] = ()
) -> list[CheckResult]:
    """Token, then XOAUTH2 (submission) or the Graph permission probe; then, for the ``send_as``
    addresses devices may use, whether the mailbox may send as them (what the token can see)."""
    if t.type == "submission" and t.m365.auth == "basic":
        return [
            warned(
                f"[{t.name}] Basic auth {t.m365.mailbox}",
                "SMTP AUTH with a password (Basic): Microsoft disables it by default at the end of "
                "December 2026 (then 550 5.7.30)",
                'Switch to auth = "xoauth2" with an app registration (tenant, client_id, secret)',
            )
        ]
    token, results = await check_token(t)
    if token is not None:
        if t.type == "submission":
            login = await check_xoauth2(t, token, timeout_s=timeout_s)
            results.append(login)
            if send_as and login.status is Status.PASS:
                results += await check_send_as_smtp(t, token, send_as, timeout_s=timeout_s)
        else:
            probe = await check_graph(t, token, timeout_s=timeout_s)
            results.append(probe)
            if send_as and probe.status is Status.PASS:
                results += await check_send_as_graph(t, token, send_as, timeout_s=timeout_s)
    return [replace(r, name=f"[{t.name}] {r.name}") for r in results]


async def _transport(
    t: TransportSettings, opts: ConfigDoctorOptions, risks: list[SendAsRisk]
) -> list[CheckResult]:
    timeout_s = opts.timeout_s
    results = await transport_network(t, timeout_s=timeout_s)
    if t.type == "connector":  # the causes of 5.7.64 the relay's side can show
        results += await asyncio.to_thread(check_client_certificate, t, now=opts.now)
    if t.type in OAUTH_TYPES:
        addresses = tuple(dict.fromkeys(a for r in risks if r.transport == t.name for a in r.addresses))
        results += await transport_auth(t, timeout_s=timeout_s, send_as=addresses)
    return results


def send_as_rows(risks: list[SendAsRisk]) -> list[CheckResult]:
    """One warning per device whose senders will meet 5.7.60 / ErrorSendAsDenied (see sendas.py)."""
    return [warned(f"Senders of {r.device} on {r.transport}", r.message, r.fix) for r in risks]


async def relay_checks(settings: Settings, opts: ConfigDoctorOptions) -> list[CheckResult]:
    results = [check_listener_cert(listener, now=opts.now) for listener in settings.listeners]
    results += check_spool_dir(
        settings.server.spool_dir, warn_bytes=opts.spool_warn_bytes, fail_bytes=opts.spool_fail_bytes
    )
    results += await check_postgres(settings)
    results += await check_queue(settings)
    return results


def _dns_jobs(settings: Settings, opts: ConfigDoctorOptions) -> list[Awaitable[list[CheckResult]]]:
    jobs: list[Awaitable[list[CheckResult]]] = []
    seen: set[str] = set()
    for t in settings.transports:
        if t.type not in ("direct_send", "connector"):
            continue
        nameserver = t.m365.nameservers[0] if t.m365.nameservers else opts.nameserver
        for domain in t.m365.accepted_domains:
            if domain in seen:
                continue
            seen.add(domain)
            aresolver = make_async_resolver(nameserver, timeout=opts.timeout_s)
            jobs.append(check_mx(domain, aresolver))
            resolver = make_resolver(nameserver, timeout=opts.timeout_s)
            jobs.append(check_spf(domain, resolver, public_ip=opts.public_ip))
    return jobs


async def run_config_doctor(opts: ConfigDoctorOptions) -> list[CheckResult]:
    """All checks for one relay365.toml; a config that does not load gives its one fail row."""
    settings, loaded = check_config(opts.config)
    if settings is None:
        return [loaded]
    risks = send_as_risks(settings)
    jobs: list[Awaitable[list[CheckResult]]] = [relay_checks(settings, opts)]
    jobs += [_transport(t, opts, risks) for t in settings.transports]
    jobs.append(check_message_trace(settings, timeout_s=opts.timeout_s))
    if opts.check_dns:
        jobs += _dns_jobs(settings, opts)
    batches = await asyncio.gather(*jobs)
    results = [loaded, *send_as_rows(risks), *(r for batch in batches for r in batch)]
    if opts.send_test is not None:
        results += await send_test_checks(settings, opts.send_test)
    return results
