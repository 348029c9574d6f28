"""The client certificate a connector transport presents to Exchange Online, checked the way Microsoft's
5.7.64 articles list the causes of ``550 5.7.64 TenantAttribution; Relay Access Denied``:

- not expired (and how many days are left);
- a chain to a trusted root: Exchange Online trusts public CAs, and the server must send the whole
  chain: a missing intermediate is the cause in KB 3212877 (https://support.microsoft.com/help/3212877);
- a subject CN or SAN in one of the tenant's accepted domains, matching the inbound connector's
  ``TlsSenderCertificateName`` (https://learn.microsoft.com/exchange/troubleshoot/email-delivery/ndr/
  relay-access-denied-smtp: "the certificate on-premises no longer matches the certificate that is
  specified in Microsoft 365");
- usable for TLS client authentication (extended key usage clientAuth, RFC 5280 4.2.1.12);
- the private key in ``client_key_file`` belongs to the certificate (else the handshake fails).
"""

from __future__ import annotations

import datetime as dt
import ssl
import warnings
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay365.diagnostics.checks.result import CheckResult, failed, passed, warned
from relay365.settings import TransportSettings

EXPIRY_WARN_DAYS = 30


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n).lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    names += [str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return list(dict.fromkeys(names))


def _in_domains(name: str, domains: tuple[str, ...]) -> bool:
    bare = name.removeprefix("*.")
    return any(bare == d or bare.endswith("." + d) for d in domains)


def system_roots() -> list[x509.Certificate]:
    """The CAs this machine trusts (the system bundle Python's ssl loads by default)."""
    context = ssl.create_default_context()
    roots = []
    with warnings.catch_warnings():
        # Some long-lived roots carry a non-positive serial number; cryptography warns but parses them.
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        for der in context.get_ca_certs(binary_form=True):
            roots.append(x509.load_der_x509_certificate(der))
    return roots


def _chain(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    roots: list[x509.Certificate],
    now: dt.datetime,
) -> tuple[bool, str]:
    """(trusted, what was found): verify leaf + intermediates up to one of ``roots``."""
    policy = (
        verification.PolicyBuilder()
        .store(verification.Store(roots))
        .time(now)
        # The webpki rules for leaf extensions are stricter than Exchange Online's (checked below).
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=verification.ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    try:
        verified = policy.verify(leaf, intermediates)
    except verification.VerificationError:
        pass
    else:
        top = verified.chain[-1].subject.rfc4514_string()
        return True, f"chains to {top} ({len(verified.chain)} certificates)"
    # Why not: follow the issuers through the file to say which link is missing.
    by_subject = {c.subject: c for c in intermediates}
    current = leaf
    while current.issuer in by_subject and by_subject[current.issuer] is not current:
        current = by_subject[current.issuer]
    issuer, top = current.issuer.rfc4514_string(), current.subject.rfc4514_string()
    same_name = [r for r in roots if r.subject == current.issuer]
    if any(_signed_by(current, r) for r in same_name):
        return False, f"the chain to {issuer} does not verify (an expired or invalid CA certificate)"
    if same_name:
        return False, f"signed by a CA named {issuer} that is not the trusted root of that name"
    if current.issuer == current.subject:
        return False, f"ends at {top}, which is not a trusted (public) root"
    return False, (
        f"incomplete chain or untrusted CA: the certificate of its issuer {issuer} is neither in "
        "client_cert_file nor a trusted (public) root (put the intermediates after the certificate)"
    )


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def check_client_certificate(
    transport: TransportSettings,
    *,
    now: dt.datetime | None = None,
    roots: list[x509.Certificate] | None = None,
) -> list[CheckResult]:
    """The connector's ``client_cert_file``/``client_key_file`` (see the module docstring)."""
    label = f"[{transport.name}] Client certificate"
    path, key_path = transport.client_cert_file, transport.client_key_file
    if path is None:
        return [passed(label, "none: the connector must know this relay by its static public IP instead")]
    when = now or dt.datetime.now(dt.UTC)
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        return [failed(label, f"cannot read {path}: {exc}", "Point client_cert_file at a PEM certificate")]
    leaf, intermediates = certs[0], certs[1:]
    subject = leaf.subject.rfc4514_string()
    results = [_validity(label, subject, leaf, when)]
    trusted_roots = list(system_roots()) if roots is None else list(roots)
    private = _private_roots(transport)
    trusted, found = _chain(leaf, intermediates, trusted_roots + private, when)
    if trusted:
        vouched = (
            ""
            if _chain(leaf, intermediates, trusted_roots, when)[0]
            else (" through ca_file (a private CA: Exchange Online trusts public CAs only)")
        )
        status = warned if vouched else passed
        results.append(status(f"{label} chain", found + vouched, "Use a certificate from a public CA"))
    else:
        results.append(
            failed(f"{label} chain", found, "Send the full chain from a public CA; otherwise 550 5.7.64")
        )
    results.append(_domains(label, leaf, transport.m365.accepted_domains))
    results.append(_usage(label, leaf))
    if key_path is not None:
        results.append(_key_match(label, leaf, key_path))
    return results


def _private_roots(transport: TransportSettings) -> list[x509.Certificate]:
    if transport.ca_file is None:
        return []
    try:
        return list(x509.load_pem_x509_certificates(Path(transport.ca_file).read_bytes()))
    except (OSError, ValueError):
        return []


def _validity(label: str, subject: str, cert: x509.Certificate, now: dt.datetime) -> CheckResult:
    expires = cert.not_valid_after_utc
    if expires <= now:
        return failed(
            f"{label} validity",
            f"{subject} expired on {expires:%Y-%m-%d}",
            "Renew it and update the connector if its name changes; until then 550 5.7.64",
        )
    if now < cert.not_valid_before_utc:
        return failed(
            f"{label} validity", f"not valid before {cert.not_valid_before_utc:%Y-%m-%d}", "Check the clock"
        )
    days = (expires - now).days
    detail = f"{subject} valid until {expires:%Y-%m-%d} ({days} days left)"
    if days < EXPIRY_WARN_DAYS:
        return warned(f"{label} validity", detail, "Renew it before it expires")
    return passed(f"{label} validity", detail)


def _domains(label: str, cert: x509.Certificate, domains: tuple[str, ...]) -> CheckResult:
    names = _names(cert)
    shown = ", ".join(names) or "(no DNS names)"
    if not domains:
        return warned(
            f"{label} name",
            f"names {shown}; accepted_domains is not set, so the doctor cannot compare",
            "List the tenant's accepted domains in the transport (accepted_domains)",
        )
    matching = [n for n in names if _in_domains(n, domains)]
    if not matching:
        return failed(
            f"{label} name",
            f"names {shown}; none is in the accepted domains {', '.join(domains)}",
            "Use a certificate whose CN or SAN is an accepted domain (the connector's "
            "TlsSenderCertificateName); otherwise 550 5.7.64",
        )
    return passed(
        f"{label} name",
        f"{', '.join(matching)} in the accepted domains "
        "(the connector's TlsSenderCertificateName must be one of them)",
    )


def _usage(label: str, cert: x509.Certificate) -> CheckResult:
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return passed(f"{label} usage", "no extended key usage: any purpose, client authentication included")
    if ExtendedKeyUsageOID.CLIENT_AUTH in usages:
        return passed(f"{label} usage", "extended key usage includes clientAuth")
    names = ", ".join(getattr(u, "_name", u.dotted_string) for u in usages)
    return failed(
        f"{label} usage",
        f"extended key usage is {names}, without clientAuth",
        "Request a certificate with the TLS Web Client Authentication (clientAuth) usage",
    )


def _key_match(label: str, cert: x509.Certificate, key_path: Path) -> CheckResult:
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        return failed(f"{label} key", f"cannot read {key_path}: {exc}", "Point client_key_file at the key")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, public) != cert.public_key().public_bytes(der, public):
        return failed(
            f"{label} key",
            f"{key_path} is not the key of the certificate",
            "Use the private key that belongs to client_cert_file",
        )
    return passed(f"{label} key", "client_key_file belongs to the certificate")
