"""Certificate, key and CA files as the preflight reads them: each problem is one sentence that names
the config key and the file, never the key material.

PEM only (what OpenSSL's ``load_cert_chain``, ``load_verify_locations`` and msal take). A file may hold
the certificate and its key together (``client_cert_file`` without ``client_key_file``, the OAuth
``certificate_file``); the first certificate is the one the key must match (RFC 5246 7.4.2: the
sender's certificate comes first in a chain).
"""

from __future__ import annotations

import datetime
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # cryptography is imported by the checks, when a certificate is configured (issue 11)
    from cryptography import x509


@dataclass(frozen=True, slots=True)
class Findings:
    problems: list[str]
    warnings: list[str]


def _read(label: str, path: Path, out: Findings) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as e:
        out.problems.append(f"{label}: cannot read {path}: {e.strerror}.")
        return None


def _world_readable(label: str, path: Path, out: Findings) -> None:
    """A private key readable by every local user: a warning (Debian's ssl-cert group keeps keys at
    0640, so group-readable is normal; world-readable never is)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & stat.S_IROTH:
        out.warnings.append(
            f"{label}: the private key in {path} is readable by every user (mode {mode:o}); run 'chmod 600'."
        )


def _spki(public_key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    assert hasattr(public_key, "public_bytes")
    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def check_pair(label: str, cert_path: Path, key_path: Path | None, out: Findings) -> x509.Certificate | None:
    """The certificate (chain) and its private key parse and belong together; returns the leaf."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cert_pem = _read(label, cert_path, out)
    if cert_pem is None:
        return None
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        out.problems.append(f"{label}: {cert_path} holds no PEM certificate.")
        return None
    key_file = key_path or cert_path
    key_pem = cert_pem if key_path is None else _read(label, key_path, out)
    if key_pem is None:
        return None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        out.problems.append(
            f"{label}: the private key in {key_file} is encrypted; relay365 cannot ask for a passphrase:"
            " store it unencrypted (mode 0600)."
        )
        return None
    except (ValueError, UnsupportedAlgorithm):
        where = "" if key_path is not None else " (give the key in its own file or append it to this one)"
        out.problems.append(f"{label}: {key_file} holds no PEM private key{where}.")
        return None
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        out.problems.append(
            f"{label}: the private key in {key_file} does not belong to the certificate in {cert_path}."
        )
        return None
    _world_readable(label, key_file, out)
    now = datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_after_utc <= now:
        out.warnings.append(
            f"{label}: the certificate in {cert_path} expired on {leaf.not_valid_after_utc:%Y-%m-%d};"
            " peers that verify it refuse it."
        )
    return leaf


def check_ca(label: str, path: Path, out: Findings) -> None:
    """A CA bundle (or pinned certificates): at least one PEM certificate."""
    from cryptography import x509

    pem = _read(label, path, out)
    if pem is None:
        return
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError:
        out.problems.append(f"{label}: {path} holds no PEM certificate.")


def is_rsa(cert: x509.Certificate) -> bool:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return isinstance(cert.public_key(), rsa.RSAPublicKey)
