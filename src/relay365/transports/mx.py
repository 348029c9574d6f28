"""MX-endpoint delivery shared by Direct Send and connector relay: the tenant's MX host from DNS
(``contoso-com.mail.protection.outlook.com``) or configured, one session pool per host, port 25.

A DNS outage (SERVFAIL, timeout, no answer from the resolver) defers the mail; a domain that does not
exist (NXDOMAIN) is permanent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.resolver

from relay365.errors import PermanentDeliveryError, TransientDeliveryError
from relay365.netdns import make_async_resolver
from relay365.settings import TransportSettings
from relay365.transports.base import OutboundMessage, Outcome, RecipientResult
from relay365.transports.smtp_client import SessionPool, send_over

log = logging.getLogger(__name__)
MX_LOOKUP_TIMEOUT = 10.0  # seconds for one MX lookup before the mail is deferred (4.4.3)


async def mx_host(resolver: dns.asyncresolver.Resolver, domain: str) -> str:
    """The most preferred MX host of ``domain``."""
    try:
        answer = await resolver.resolve(domain, "MX")
    except dns.resolver.NXDOMAIN:
        raise PermanentDeliveryError(f"550 5.1.2 Domain {domain} does not exist (DNS NXDOMAIN)") from None
    except dns.exception.SyntaxError as e:  # e.g. an internationalized label too long once encoded
        raise PermanentDeliveryError(f"553 5.1.2 Domain {domain} is not a valid DNS name: {e}") from None
    except (dns.resolver.NoAnswer, dns.resolver.NoNameservers, dns.exception.Timeout) as e:
        raise TransientDeliveryError(f"451 4.4.3 MX lookup for {domain} failed: {type(e).__name__}") from e
    records = sorted(answer, key=lambda r: r.preference)
    return str(records[0].exchange).rstrip(".")


class MxDelivery:
    """Sessions to MX hosts; ``allowed(rcpt)`` decides which recipients this route may take."""

    def __init__(
        self,
        settings: TransportSettings,
        *,
        helo_name: str,
        require_tls: bool,
        allowed: Callable[[str], bool],
    ) -> None:
        self._s = settings
        self._helo = settings.helo_name or helo_name
        self._require_tls = require_tls
        self._allowed = allowed
        self._resolver = make_async_resolver(settings.m365.nameservers, timeout=MX_LOOKUP_TIMEOUT)
        self._pools: dict[str, SessionPool] = {}

    def _pool(self, host: str) -> SessionPool:
        if host not in self._pools:

            async def connect() -> aiosmtplib.SMTP:
                s = self._s
                smtp = aiosmtplib.SMTP(
                    hostname=host,
                    port=s.port,
                    local_hostname=self._helo,
                    timeout=s.timeout,
                    start_tls=True if self._require_tls else None,
                    validate_certs=s.verify,
                    cert_bundle=str(s.ca_file) if s.ca_file else None,
                    client_cert=str(s.client_cert_file) if s.client_cert_file else None,
                    client_key=str(s.client_key_file) if s.client_key_file else None,
                )
                await smtp.connect()
                return smtp

            self._pools[host] = SessionPool(connect, max_sessions=self._s.max_sessions)
        return self._pools[host]

    async def deliver(self, name: str, message: OutboundMessage) -> list[RecipientResult]:
        results: list[RecipientResult] = []
        by_host: dict[str, list[str]] = {}
        for rcpt in message.rcpt_tos:
            if not self._allowed(rcpt):
                results.append(
                    RecipientResult(rcpt, Outcome.PERMANENT, f"550 5.7.1 {name} may not deliver to <{rcpt}>")
                )
                continue
            domain = rcpt.rpartition("@")[2].lower()
            try:
                host = self._s.host or await mx_host(self._resolver, domain)
            except TransientDeliveryError as e:
                results.append(RecipientResult(rcpt, Outcome.TRANSIENT, e.reply))
                continue
            except PermanentDeliveryError as e:
                results.append(RecipientResult(rcpt, Outcome.PERMANENT, e.reply))
                continue
            by_host.setdefault(host, []).append(rcpt)
        for host, rcpts in by_host.items():
            part = OutboundMessage(
                message.queue_id,
                message.mail_from,
                tuple(rcpts),
                message.body_path,
                message.size,
                message.smtputf8,
            )
            try:
                results += await send_over(self._pool(host), part, upstream=f"{name} ({host}:{self._s.port})")
            except TransientDeliveryError as e:
                results += [RecipientResult(r, Outcome.TRANSIENT, e.reply, e.retry_after) for r in rcpts]
            except PermanentDeliveryError as e:
                results += [RecipientResult(r, Outcome.PERMANENT, e.reply) for r in rcpts]
        return results

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
