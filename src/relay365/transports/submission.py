"""SMTP AUTH client submission (option 1): ``smtp.office365.com:587``, STARTTLS required, TLS 1.2+,
certificate verified, ``AUTH XOAUTH2`` with tokens from msal (Basic only where configured, with a loud
warning: Microsoft disables it by default at the end of December 2026). Sends as one mailbox (or a
mailbox it has Send As on), at most 3 sessions at once, paced to 30 messages/minute and 10,000
recipients/24 h (exchange-online.md, "SMTP AUTH (option 1) in detail").
"""

from __future__ import annotations

import logging
import ssl

import aiosmtplib

from relay365.credentials import load_secret
from relay365.errors import ConfigError, TokenError, TransientDeliveryError
from relay365.oauth import SMTP_SCOPE, TokenSource, token_source
from relay365.settings import TransportSettings
from relay365.transports.base import OutboundMessage, PaceLimits, RecipientResult, TransportKind
from relay365.transports.smtp_client import SessionPool, send_over

log = logging.getLogger(__name__)


class SubmissionTransport:
    def __init__(self, settings: TransportSettings, *, helo_name: str) -> None:
        m = settings.m365
        assert m.mailbox is not None
        if settings.tls != "required" and settings.tls != "implicit":
            raise ConfigError(
                f"transport {settings.name}.tls",
                settings.tls,
                "SMTP AUTH submission needs STARTTLS (tls = 'required').",
            )
        self.name = settings.name
        self.mailbox = m.mailbox
        self._s = settings
        self._helo = settings.helo_name or helo_name
        self.pacing_key = f"mailbox:{m.mailbox.lower()}"
        self.pacing = PaceLimits(
            messages_per_window=m.messages_per_minute,
            window=m.pacing_window,
            recipients_per_day=m.recipients_per_day,
            concurrency=m.connections,
        )
        self._tokens: TokenSource | None = None
        self._password: str | None = None
        if m.auth == "xoauth2":
            self._tokens = token_source(settings, scope=SMTP_SCOPE)
        else:
            if settings.password is None:
                raise ConfigError(
                    f"transport {settings.name}.password_env",
                    None,
                    "Basic auth needs password_env or password_file.",
                )
            self._password = load_secret(settings.password)
            log.warning(
                "transport %s uses Basic auth for SMTP AUTH: Microsoft disables it by default "
                "at the end of December 2026 (550 5.7.30). Switch to auth = 'xoauth2'.",
                self.name,
            )
        self._pool = SessionPool(self._connect, max_sessions=min(settings.max_sessions, m.connections))
        self.upstream = f"{settings.host}:{settings.port}"

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self._s.ca_file) if self._s.ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # Microsoft requires TLS 1.2+
        if not self._s.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self._s
        smtp = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            local_hostname=self._helo,
            timeout=s.timeout,
            use_tls=s.tls == "implicit",
            start_tls=s.tls == "required",
            tls_context=self._tls_context(),
        )
        await smtp.connect()
        try:
            if smtp.get_transport_info("sslcontext") is None:
                raise TransientDeliveryError(f"454 4.7.0 {self.upstream}: no TLS; credentials not sent")
            if self._tokens is not None:
                try:
                    token = await self._tokens.token()
                except TokenError as e:
                    raise TransientDeliveryError(f"454 4.7.0 token unavailable: {e}") from e
                try:
                    await smtp.auth_xoauth2(self.mailbox, token)
                except aiosmtplib.SMTPAuthenticationError:
                    self._tokens.invalidate()  # expired or revoked: the next try fetches a new one
                    raise
            else:
                await smtp.login(self.mailbox, self._password or "")
        except BaseException:
            smtp.close()
            raise
        return smtp

    @property
    def token_source(self) -> TokenSource | None:
        """The OAuth token source (None with Basic auth), read by the console."""
        return self._tokens

    async def deliver(self, message: OutboundMessage) -> list[RecipientResult]:
        return await send_over(self._pool, message, upstream=f"{self.name} ({self.upstream})")

    async def release_idle(self) -> None:
        await self._pool.close()  # (only the idle sessions: the pool stays usable)

    async def close(self) -> None:
        await self._pool.close()
        if self._tokens is not None:
            self._tokens.close()


# SMTP AUTH sends as its mailbox: Exchange refuses any other sender, <> included, with 5.7.60 (a login
# may send only as itself or a mailbox it has Send As on; README, "The null sender").
KIND = TransportKind(
    type="submission",
    factory=lambda settings, helo: SubmissionTransport(settings, helo_name=helo),
    carries_null_sender=False,
)
