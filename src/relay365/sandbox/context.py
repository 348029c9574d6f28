"""What every sandbox endpoint shares: the tenant, the store, faults, the clock, tokens and TLS.

``SandboxTLS`` is the sandbox's own certificate authority (``trustme``), kept in the state directory so
that devices which were told to trust it keep working across restarts, and one server certificate for
every host name the sandbox plays (``smtp.office365.com``, ``*.mail.protection.outlook.com``,
``login.microsoftonline.com``, ``graph.microsoft.com``, plus loopback names).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trustme

from relay365.sandbox.clock import Clock
from relay365.sandbox.faults import Faults
from relay365.sandbox.mailflow import MailFlow
from relay365.sandbox.mx_tls import LenientClientCertContext
from relay365.sandbox.store import MailStore
from relay365.sandbox.tenant import Tenant
from relay365.sandbox.throttle import SubmissionThrottle
from relay365.sandbox.trace import TraceLog

if TYPE_CHECKING:
    from relay365.sandbox.tokens import TokenIssuer

SERVER_NAMES = (
    "localhost",
    "127.0.0.1",
    "::1",
    "smtp.office365.com",
    "*.outlook.office365.com",
    "*.mail.protection.outlook.com",
    "login.microsoftonline.com",
    "graph.microsoft.com",
)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


class SandboxTLS:
    """The sandbox CA, its server certificate and the TLS contexts built from them."""

    def __init__(self, *, state_dir: Path, extra_client_cas: Sequence[Path] = ()) -> None:
        self.directory = state_dir / "tls"
        self.directory.mkdir(parents=True, exist_ok=True)
        ca_cert = self.directory / "ca.pem"
        ca_key = self.directory / "ca.key"
        if ca_cert.exists() and ca_key.exists():
            self.ca = trustme.CA.from_pem(ca_cert.read_bytes(), ca_key.read_bytes())
        else:
            self.ca = trustme.CA(organization_name="relay365 sandbox")
            _write_private(ca_key, self.ca.private_key_pem.bytes())
            ca_cert.write_bytes(self.ca.cert_pem.bytes())
        self.ca_pem_path = ca_cert
        self.extra_client_cas = tuple(extra_client_cas)
        self.server_cert = self.ca.issue_cert(*SERVER_NAMES, common_name="outlook.office365.com")
        self.cert_path = self.directory / "server.pem"
        self.key_path = self.directory / "server.key"
        chain = b"".join(blob.bytes() for blob in self.server_cert.cert_chain_pems)
        self.cert_path.write_bytes(chain)
        _write_private(self.key_path, self.server_cert.private_key_pem.bytes())

    def server_context(self) -> ssl.SSLContext:
        """A server context presenting the sandbox certificate; TLS 1.2 minimum, as Exchange Online."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        return context

    def mx_server_context(self) -> LenientClientCertContext:
        """For the MX endpoint: asks for an optional client certificate (connector attribution) and,
        as Exchange Online, never fails the handshake over it; whether its chain ends at the sandbox
        CA or a configured extra CA is left for the session to judge (5.7.64). See :mod:`.mx_tls`."""
        return LenientClientCertContext(
            cert_chain=self.cert_path,
            key=self.key_path,
            trusted_cas=(self.ca_pem_path, *self.extra_client_cas),
        )

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts the sandbox CA (for tests and the CLI)."""
        context = ssl.create_default_context(cafile=str(self.ca_pem_path))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def issue_client_certificate(self, common_name: str, *sans: str) -> tuple[Path, Path]:
        """A client certificate (e.g. for a connector's TlsSenderCertificateName) signed by the sandbox CA.

        Returns ``(certificate_chain_path, key_path)`` in the state directory."""
        names = sans or (common_name,)
        leaf = self.ca.issue_cert(*names, common_name=common_name)
        safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in common_name)
        cert_path = self.directory / f"client-{safe}.pem"
        key_path = self.directory / f"client-{safe}.key"
        cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        _write_private(key_path, leaf.private_key_pem.bytes())
        return cert_path, key_path


@dataclass
class SandboxContext:
    """Everything the endpoints share. Built once by the runner and passed down."""

    tenant: Tenant
    store: MailStore
    faults: Faults
    clock: Clock
    issuer: TokenIssuer
    tls: SandboxTLS
    trace: TraceLog
    # The mailboxes' sending limits, shared by every protocol that submits as a mailbox (SMTP AUTH and
    # Graph): Exchange counts a mailbox's recipients and messages whatever client sent them.
    sending: SubmissionThrottle = field(init=False)
    # What happens after acceptance: rules, anti-spoofing, folders and the message trace (mailflow).
    mailflow: MailFlow = field(init=False)

    def __post_init__(self) -> None:
        self.sending = SubmissionThrottle(limits=lambda: self.tenant.limits, clock=self.clock)
        host = self.tenant.accepted_domains[0].replace(".", "-") + ".mail.protection.outlook.com"
        self.mailflow = MailFlow(
            tenant=lambda: self.tenant, store=self.store, trace=self.trace, clock=self.clock, host=host
        )


def create_context(
    tenant: Tenant,
    *,
    state_dir: Path,
    issuer_host: str,
    clock: Clock | None = None,
    extra_client_cas: Sequence[Path] = (),
) -> SandboxContext:
    """A fresh context: store in ``<state_dir>/mail``, the message trace in ``<state_dir>/trace``, TLS
    material in ``<state_dir>/tls``."""
    from relay365.sandbox.tokens import TokenIssuer

    clock = clock or Clock()
    tls = SandboxTLS(state_dir=state_dir, extra_client_cas=extra_client_cas)
    return SandboxContext(
        tenant=tenant,
        store=MailStore(state_dir / "mail", clock=clock),
        faults=Faults(),
        clock=clock,
        # The signing key is kept with the TLS material, so tokens survive a sandbox restart.
        issuer=TokenIssuer(
            tenant, clock, issuer_host=issuer_host, key_file=state_dir / "tls" / "token-signing.key"
        ),
        tls=tls,
        trace=TraceLog(state_dir / "trace"),
    )
