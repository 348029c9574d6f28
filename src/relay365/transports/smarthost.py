"""A generic SMTP smart host: STARTTLS required / opportunistic / off or implicit TLS, optional AUTH
PLAIN/LOGIN (never in clear), optional client certificate, certificate verification on by default,
and one upstream session reused for several messages.
"""

from __future__ import annotations

import logging

import aiosmtplib

from relay365.credentials import load_secret
from relay365.errors import ConfigError, TransientDeliveryError
from relay365.settings import TransportSettings
from relay365.transports.base import OutboundMessage, RecipientResult, TransportKind
from relay365.transports.smtp_client import SessionPool, send_over

log = logging.getLogger(__name__)


class SmartHostTransport:
    def __init__(self, settings: TransportSettings, *, helo_name: str) -> None:
        if settings.username and settings.tls == "none":
            raise ConfigError(
                f"transport {settings.name}.tls", "none", "AUTH without TLS would send the password in clear."
            )
        self.name = settings.name
        self._s = settings
        self._helo = settings.helo_name or helo_name
        self._password = load_secret(settings.password) if settings.password else None
        self._pool = SessionPool(self._connect, max_sessions=settings.max_sessions)
        self.upstream = f"{settings.host}:{settings.port}"

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self._s
        smtp = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            local_hostname=self._helo,
            timeout=s.timeout,
            use_tls=s.tls == "implicit",
            start_tls={"required": True, "opportunistic": None}.get(s.tls, False),
            validate_certs=s.verify,
            cert_bundle=str(s.ca_file) if s.ca_file else None,
            client_cert=str(s.client_cert_file) if s.client_cert_file else None,
            client_key=str(s.client_key_file) if s.client_key_file else None,
        )
        await smtp.connect()
        try:
            if smtp.is_ehlo_or_helo_needed:
                await smtp.ehlo()
            if s.username:
                if smtp.get_transport_info("sslcontext") is None:
                    log.critical(
                        "ALERT %s: %s offered no TLS; credentials not sent", self.name, self.upstream
                    )
                    raise TransientDeliveryError(
                        f"454 4.7.0 {self.upstream} offered no STARTTLS; refusing to send credentials"
                    )
                await smtp.login(s.username, self._password or "")
        except BaseException:
            smtp.close()
            raise
        return smtp

    async def deliver(self, message: OutboundMessage) -> list[RecipientResult]:
        return await send_over(self._pool, message, upstream=f"{self.name} ({self.upstream})")

    async def close(self) -> None:
        await self._pool.close()


# Any SMTP server accepts the null sender (RFC 5321 4.5.5).
KIND = TransportKind(
    type="smarthost",
    factory=lambda settings, helo: SmartHostTransport(settings, helo_name=helo),
    carries_null_sender=True,
)
