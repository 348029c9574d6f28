"""TLS checks: handshake (version, cipher) and the server certificate (chain, name, expiry).

The first handshake verifies the certificate (the system's CAs or ``ca_file``) and the name, as
relay365's transports do. If verification fails, a second, non-verifying handshake reads the certificate
so the report can say *why* (expired on ..., issued for ...).
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from relay365.diagnostics.checks.result import CheckResult, failed, passed, warned
from relay365.diagnostics.checks.smtpwire import SmtpDialogError, SmtpProbe

EXPIRY_WARN_DAYS = 30


def verifying_context(ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # Exchange Online requires TLS 1.2+
    return ctx


def reading_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only to read a certificate that failed verification
    return ctx


@dataclass(frozen=True, slots=True)
class Handshake:
    version: str
    cipher: str
    certificate: x509.Certificate | None


async def handshake(
    host: str, port: int, ctx: ssl.SSLContext, *, starttls: bool, server_name: str, timeout_s: float
) -> Handshake:
    """One TLS handshake, implicit or after SMTP STARTTLS. Raises ssl.SSLError, OSError, TimeoutError,
    SmtpDialogError."""
    implicit = None if starttls else ctx
    async with SmtpProbe(
        host, port, timeout_s=timeout_s, implicit_tls=implicit, server_name=server_name
    ) as probe:
        if starttls:
            await probe.ehlo()
            reply = await probe.starttls(ctx)
            if reply.code != 220:
                raise SmtpDialogError(f"STARTTLS refused: {reply.code} {reply.text}")
        obj = probe.ssl_object
        if obj is None:
            raise SmtpDialogError("no TLS session")
        der = obj.getpeercert(binary_form=True)
        cipher = obj.cipher()
        return Handshake(
            obj.version() or "?",
            cipher[0] if cipher else "?",
            x509.load_der_x509_certificate(der) if der else None,
        )


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(n) for n in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return names or [str(c.value) for c in cns]


async def check_tls(
    host: str,
    port: int,
    *,
    starttls: bool,
    server_name: str | None = None,
    ca_file: str | None = None,
    timeout_s: float = 10.0,
    now: dt.datetime | None = None,
) -> list[CheckResult]:
    """Handshake and certificate checks for ``host:port`` (``starttls`` for 25/587, implicit for 465)."""
    sni = server_name or host
    where = f"{host}:{port}"
    verify_error: str | None = None
    try:
        hs = await handshake(
            host, port, verifying_context(ca_file), starttls=starttls, server_name=sni, timeout_s=timeout_s
        )
    except ssl.SSLCertVerificationError as exc:
        verify_error = exc.verify_message or str(exc)
        try:
            hs = await handshake(
                host, port, reading_context(), starttls=starttls, server_name=sni, timeout_s=timeout_s
            )
        except (ssl.SSLError, OSError, TimeoutError, SmtpDialogError) as exc2:
            return [failed(f"TLS handshake {where}", str(exc2), "Check the server's TLS configuration")]
    except (ssl.SSLError, OSError, TimeoutError, SmtpDialogError) as exc:
        detail = str(exc) or exc.__class__.__name__
        fix = (
            "The server must offer TLS 1.2 or later"
            if isinstance(exc, ssl.SSLError)
            else "Check host and port"
        )
        return [failed(f"TLS handshake {where}", detail, fix)]
    results = [passed(f"TLS handshake {where}", f"{hs.version}, {hs.cipher}")]
    if hs.version in ("TLSv1", "TLSv1.1", "SSLv3"):
        results[0] = failed(f"TLS handshake {where}", f"{hs.version}: too old", "Enable TLS 1.2 or later")
    results.append(
        _certificate_result(where, sni, hs.certificate, verify_error, now or dt.datetime.now(dt.UTC))
    )
    return results


def _certificate_result(
    where: str, sni: str, cert: x509.Certificate | None, verify_error: str | None, now: dt.datetime
) -> CheckResult:
    name = f"TLS certificate {where}"
    if cert is None:
        return failed(name, "the server sent no certificate", "Install a certificate")
    names = ", ".join(_names(cert)) or "(no names)"
    not_after = cert.not_valid_after_utc
    days = (not_after - now).days
    issuer = cert.issuer.rfc4514_string()
    if now > not_after:
        return failed(name, f"expired on {not_after:%Y-%m-%d} ({names})", "Renew the certificate")
    if now < cert.not_valid_before_utc:
        return failed(
            name, f"not valid before {cert.not_valid_before_utc:%Y-%m-%d}", "Check the server clock"
        )
    if verify_error is not None:
        fix = (
            f"The certificate is for {names}, not {sni}"
            if "mismatch" in verify_error.lower() or "hostname" in verify_error.lower()
            else "Send the full chain (intermediates); use a CA the client trusts (--ca-file: private CA)"
        )
        return failed(name, f"{verify_error} (issued by {issuer} for {names})", fix)
    if days < EXPIRY_WARN_DAYS:
        return warned(
            name, f"valid for {names}, expires in {days} days ({not_after:%Y-%m-%d})", "Renew it soon"
        )
    return passed(name, f"valid for {names}, chain trusted, expires {not_after:%Y-%m-%d} ({days} days)")
