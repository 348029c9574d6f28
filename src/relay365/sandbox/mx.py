"""The MX endpoint: the ``contoso-test.mail.protection.outlook.com`` role (port 25).

Anonymous SMTP for Direct Send and connector relay (``docs/exchange-online.md``):

- internal recipients (accepted domains) are accepted when the mailbox exists, else
  ``550 5.4.1 Recipient address rejected: Access denied``;
- external recipients only when an enabled inbound connector matches the peer, by source IP
  (``sender_ip_ranges``) or by the verified TLS client certificate (CN or SAN DNS name equal to the
  connector's ``tls_sender_certificate_name``, an accepted domain or a name under one); otherwise
  ``550 5.7.64 TenantAttribution; Relay Access Denied`` when the session looks like it wanted a
  connector (a certificate naming an accepted domain, or an accepted-domain sender in a tenant that has
  connectors), else ``550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain``;
- ``RejectDirectSend``: an accepted-domain MAIL FROM without a matching connector gets
  ``550 5.7.68 TenantInboundAttribution; Direct Send not allowed for this organization from
  unauthorized sources``;
- STARTTLS is optional and asks for (but does not require) a client certificate; a certificate whose
  chain does not end at a trusted CA does not break the handshake (:mod:`.mx_tls`): it simply
  attributes nothing, so relaying is refused with 5.7.64 as Exchange Online does;
- messages up to `max_receive_message_size` (36 MB by default: Exchange Online receives 36 MB, sends 35 MB);
- connectors and SPF judge the peer as Microsoft sees it (``Tenant.public_ip``); after ``250`` the
  message goes through :mod:`.mailflow` (mail flow rules, SPF and anti-spoofing, folders, trace).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any, ClassVar

from relay365.sandbox.context import SandboxContext
from relay365.sandbox.mailflow import Submission
from relay365.sandbox.mx_tls import ClientCertificate, LenientClientCertContext, LenientSSLObject
from relay365.sandbox.smtp_common import ExchangeSMTP, SmtpEndpoint, server_name
from relay365.sandbox.tenant import InboundConnector

logger = logging.getLogger(__name__)

UNKNOWN_RECIPIENT = "550 5.4.1 Recipient address rejected: Access denied."
RELAY_DENIED = "550 5.7.64 TenantAttribution; Relay Access Denied"
NOT_ACCEPTED_DOMAIN = "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
DIRECT_SEND_REJECTED = (
    "550 5.7.68 TenantInboundAttribution; Direct Send not allowed for this organization from "
    "unauthorized sources"
)
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _name_matches(pattern: str, name: str) -> bool:
    pattern, name = pattern.lower(), name.lower()
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and name.count(".") == pattern.count(".")
    return pattern == name


class MxSMTP(ExchangeSMTP):
    endpoint: ClassVar[str] = "mx"

    def __init__(
        self,
        *,
        ctx: SandboxContext,
        endpoint: SmtpEndpoint,
        host_name: str,
        tls_context: LenientClientCertContext,
    ) -> None:
        super().__init__(ctx=ctx, host_name=host_name, tls_context=tls_context, on_close=endpoint.forget)

    def ehlo_keywords(self) -> list[str]:
        keywords = [
            f"SIZE {self.ctx.tenant.limits.smtp_advertised_size}",
            "PIPELINING",
            "DSN",
            "ENHANCEDSTATUSCODES",
        ]
        if not self.tls_active:
            keywords.append("STARTTLS")
        return [*keywords, "8BITMIME", "BINARYMIME", "CHUNKING", "SMTPUTF8"]

    async def smtp_AUTH(self, arg: str | None) -> None:
        await self.send_reply("504 5.7.4 Unrecognized authentication type")

    # -- attribution --------------------------------------------------------------------------

    @property
    def public_ip(self) -> str:
        """The peer as Microsoft would see it: the tenant file may map a loopback peer to the public
        address of the office's NAT (``[public_ip]``); connectors and SPF judge that address."""
        return self.ctx.tenant.public_ip(self.peer_ip)

    def client_certificate(self) -> ClientCertificate | None:
        """The certificate the client presented after STARTTLS, with its chain's verdict."""
        if not self.tls_active or self.transport is None:
            return None
        tls = self.transport.get_extra_info("ssl_object")
        return tls.client_certificate() if isinstance(tls, LenientSSLObject) else None

    def certificate_names(self) -> list[str]:
        """Names of a *trusted* client certificate: only those can attribute the session."""
        cert = self.client_certificate()
        return list(cert.names) if cert is not None and cert.trusted else []

    def matching_connector(self) -> InboundConnector | None:
        """The first enabled connector that identifies this peer (certificate first, then IP)."""
        tenant = self.ctx.tenant
        names = self.certificate_names()
        for connector in tenant.connectors:
            wanted = connector.tls_sender_certificate_name
            if (
                connector.enabled
                and wanted
                and tenant.owns_name(wanted)
                and any(_name_matches(wanted, name) for name in names)
            ):
                return connector
        try:
            peer = ipaddress.ip_address(self.public_ip)
        except ValueError:
            return None
        for connector in tenant.connectors:
            if connector.enabled and any(peer in network for network in connector.sender_ip_ranges):
                return connector
        return None

    def _wanted_connector(self, mail_from: str) -> bool:
        """Did this session try to be attributed to the tenant (so a failed match is 5.7.64)?"""
        tenant = self.ctx.tenant
        cert = self.client_certificate()  # trusted or not: it shows the sender meant a connector
        if cert is not None and any(tenant.owns_name(name) for name in cert.names):
            return True
        has_connectors = any(c.enabled for c in tenant.connectors)
        return has_connectors and tenant.is_accepted_domain(_domain(mail_from))

    # -- transaction --------------------------------------------------------------------------

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:  # fmt: skip
        reply = await self.fault("mail")
        if reply is not None:
            return self.reject(reply)
        limit = self.ctx.tenant.limits.max_receive_message_size
        for option in mail_options:
            name, _, value = option.partition("=")
            if name == "SIZE" and value.isdigit() and int(value) > limit:
                return self.reject(TOO_BIG)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:  # fmt: skip
        reply = await self.fault("rcpt")
        if reply is not None:
            return self.reject(reply)
        tenant = self.ctx.tenant
        if len(envelope.rcpt_tos) >= tenant.limits.max_recipients_per_message:
            return self.reject(TOO_MANY_RECIPIENTS)
        mail_from = envelope.mail_from or ""
        connector = self.matching_connector()
        if tenant.is_internal_address(address):
            if tenant.mailbox(address) is None:
                return self.reject(f"{UNKNOWN_RECIPIENT} [{self.hostname}]")
            if (
                tenant.reject_direct_send
                and connector is None
                and tenant.is_accepted_domain(_domain(mail_from))
            ):
                return self.reject(f"{DIRECT_SEND_REJECTED} [{self.hostname}]")
        elif connector is None:
            if self._wanted_connector(mail_from):
                return self.reject(f"{RELAY_DENIED} [{self.hostname}]")
            return self.reject(NOT_ACCEPTED_DOMAIN)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await self.fault("after_data")
        if reply is not None:
            return self.reject(reply)
        content: bytes = envelope.original_content
        if len(content) > self.ctx.tenant.limits.max_receive_message_size:
            return self.reject(TOO_BIG)
        connector = self.matching_connector()
        accepted = self.ctx.mailflow.accept(
            Submission(
                endpoint=self.endpoint,
                mail_from=envelope.mail_from or "",
                recipients=tuple(envelope.rcpt_tos),
                content=content,
                authenticated_as=f"connector:{connector.name}" if connector is not None else None,
                client_ip=self.public_ip,
                helo=str(getattr(session, "host_name", "") or ""),
                connector=connector.name if connector is not None else None,
            )
        )
        return (
            f"250 2.6.0 {accepted.message_id} [InternalId={accepted.internal_id}, Hostname={self.hostname}] "
            "Queued mail for delivery"
        )


def mx_endpoint(ctx: SandboxContext) -> SmtpEndpoint:
    """The MX endpoint (not yet listening; call ``start``)."""
    host_name = server_name("mail.protection.outlook.com")
    tls_context = ctx.tls.mx_server_context()

    def factory(endpoint: SmtpEndpoint) -> ExchangeSMTP:
        return MxSMTP(ctx=ctx, endpoint=endpoint, host_name=host_name, tls_context=tls_context)

    return SmtpEndpoint(name="mx", factory=factory)
