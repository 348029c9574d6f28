"""doctor: the connector's client certificate, checked for each cause of 550 5.7.64 Microsoft lists."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay365.diagnostics.checks import Status
from relay365.diagnostics.checks.client_cert import check_client_certificate
from relay365.diagnostics.doctor_config import ConfigDoctorOptions, run_config_doctor
from relay365.settings import TransportSettings, parse_settings

from .cfgfiles import write_config

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
Key = ec.EllipticCurvePrivateKey


def cert(
    name: str,
    key: Key,
    *,
    issuer: tuple[x509.Certificate, Key] | None = None,
    ca: bool = False,
    usages: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    days: int = 365,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_cert, signer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_cert.subject if signer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=30))
        .not_valid_after(NOW + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    if signer_cert is not None or ca:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key((signer_key).public_key()), critical=False
        )
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
    )
    return builder.sign(signer_key, hashes.SHA256())


class Pki:
    def __init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = cert("Public Root CA", self.root_key, ca=True, days=3650)
        self.inter_key = ec.generate_private_key(ec.SECP256R1())
        self.inter = cert(
            "Issuing CA 1", self.inter_key, issuer=(self.root, self.root_key), ca=True, days=1800
        )

    def leaf(self, name: str = "relay.contoso.com", **kwargs: object) -> tuple[x509.Certificate, Key]:
        key = ec.generate_private_key(ec.SECP256R1())
        return cert(name, key, issuer=(self.inter, self.inter_key), **kwargs), key  # type: ignore[arg-type]


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def connector(
    tmp_path: Path, chain: bytes, key: Key, domains: tuple[str, ...] = ("contoso.com",)
) -> TransportSettings:
    (tmp_path / "client.pem").write_bytes(chain)
    (tmp_path / "client.key").write_bytes(key_pem(key))
    data = {
        "transport": [
            {
                "name": "connector",
                "type": "connector",
                "host": "127.0.0.1",
                "client_cert_file": "client.pem",
                "client_key_file": "client.key",
                "accepted_domains": list(domains),
            }
        ]
    }
    return parse_settings(data, base=tmp_path).transports[0]


def rows(
    tmp_path: Path, t: TransportSettings, pki: Pki, now: dt.datetime = NOW
) -> dict[str, tuple[Status, str]]:
    results = check_client_certificate(t, now=now, roots=[pki.root])
    return {
        r.name.removeprefix("[connector] Client certificate").strip() or "": (r.status, r.detail)
        for r in results
    }


@pytest.fixture
def pki() -> Pki:
    return Pki()


def test_a_good_certificate_passes_every_check(tmp_path: Path, pki: Pki) -> None:
    leaf, key = pki.leaf()
    found = rows(tmp_path, connector(tmp_path, pem(leaf, pki.inter), key), pki)
    assert {name: status for name, (status, _) in found.items()} == {
        "validity": Status.PASS, "chain": Status.PASS, "name": Status.PASS, "usage": Status.PASS,
        "key": Status.PASS,
    }  # fmt: skip
    assert "(365 days left)" in found["validity"][1]
    assert "chains to CN=Public Root CA (3 certificates)" in found["chain"][1]


def test_expiry_warns_then_fails(tmp_path: Path, pki: Pki) -> None:
    leaf, key = pki.leaf(days=20)
    t = connector(tmp_path, pem(leaf, pki.inter), key)
    assert rows(tmp_path, t, pki)["validity"][0] is Status.WARN
    expired = rows(tmp_path, t, pki, now=NOW + dt.timedelta(days=21))["validity"]
    assert expired[0] is Status.FAIL and "expired on" in expired[1]


def test_incomplete_chain_and_untrusted_root(tmp_path: Path, pki: Pki) -> None:
    leaf, key = pki.leaf()
    alone = rows(tmp_path, connector(tmp_path, pem(leaf), key), pki)["chain"]
    assert alone[0] is Status.FAIL and "incomplete chain" in alone[1] and "Issuing CA 1" in alone[1]
    other = Pki()
    foreign, foreign_key = other.leaf()
    untrusted = rows(tmp_path, connector(tmp_path, pem(foreign, other.inter), foreign_key), pki)["chain"]
    assert untrusted[0] is Status.FAIL and "not the trusted root of that name" in untrusted[1]
    self_signed = rows(tmp_path, connector(tmp_path, pem(other.root), other.root_key), pki)["chain"]
    assert self_signed[0] is Status.FAIL and "not the trusted root of that name" in self_signed[1]


def test_name_usage_and_key(tmp_path: Path, pki: Pki) -> None:
    leaf, key = pki.leaf("relay.fabrikam.com", usages=(ExtendedKeyUsageOID.SERVER_AUTH,))
    _, other_key = pki.leaf()
    found = rows(tmp_path, connector(tmp_path, pem(leaf, pki.inter), key), pki)
    assert (
        found["name"][0] is Status.FAIL and "none is in the accepted domains contoso.com" in found["name"][1]
    )
    assert found["usage"][0] is Status.FAIL and "without clientAuth" in found["usage"][1]
    mismatched = rows(tmp_path, connector(tmp_path, pem(leaf, pki.inter), other_key), pki)["key"]
    assert mismatched[0] is Status.FAIL and "is not the key of the certificate" in mismatched[1]
    wildcard, wildcard_key = pki.leaf("*.contoso.com")
    assert (
        rows(tmp_path, connector(tmp_path, pem(wildcard, pki.inter), wildcard_key), pki)["name"][0]
        is Status.PASS
    )


async def test_doctor_config_reports_the_connector_certificate(tmp_path: Path, pki: Pki) -> None:
    leaf, key = pki.leaf()
    (tmp_path / "client.pem").write_bytes(pem(leaf))  # no intermediate: the KB 3212877 mistake
    (tmp_path / "client.key").write_bytes(key_pem(key))
    transport = {
        "name": "connector", "type": "connector", "host": "127.0.0.1", "port": 9,
        "client_cert_file": str(tmp_path / "client.pem"), "client_key_file": str(tmp_path / "client.key"),
        "accepted_domains": ["contoso.com"],
    }  # fmt: skip
    cfg = write_config(tmp_path, transport=[transport])
    results = await run_config_doctor(ConfigDoctorOptions(config=cfg, timeout_s=2, now=NOW))
    by_name = {r.name: r for r in results}
    assert by_name["[connector] Client certificate chain"].status is Status.FAIL
    assert by_name["[connector] Client certificate key"].status is Status.PASS
