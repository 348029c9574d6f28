"""The SMTP AUTH client submission endpoint: the ``smtp.office365.com`` role (port 587).

Behaviour and reply texts (sources in ``docs/exchange-online.md`` and the comments below):

- EHLO before STARTTLS offers ``STARTTLS`` and no AUTH; after it ``AUTH LOGIN XOAUTH2`` (TLS 1.2+).
- ``AUTH XOAUTH2``: ``base64("user=" + mailbox + "\\x01auth=Bearer " + token + "\\x01\\x01")``; the token
  must be the sandbox's own, for ``https://outlook.office365.com``, with ``SMTP.SendAsApp`` (app) or
  ``SMTP.Send`` (delegated) and access to the mailbox. ``AUTH LOGIN`` (Basic) only where the tenant
  still allows it, else ``550 5.7.30``. ``AUTH PLAIN`` is not offered and answered ``504 5.7.4``.
- ``MAIL`` without AUTH: ``530 5.7.57``; more than N senders per mailbox: ``432 4.3.2``; an envelope
  sender the login may not send as: ``550 5.7.60``.
- After DATA: size ``552 5.3.4``; a From: header the login may not send as ``554 5.2.252 SendAsDenied``;
  unlicensed mailbox; rolling daily recipients ``554 5.2.0``; per-minute excess accepted but counted
  as ``submission throttled`` (Microsoft delays it to the following minutes).
- A copy of each accepted message in the login mailbox's Sent Items.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import ssl
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Any, ClassVar

from aiosmtpd.smtp import MISSING

from relay365.sandbox.context import SandboxContext
from relay365.sandbox.mailflow import Submission
from relay365.sandbox.smtp_common import ExchangeSMTP, SmtpEndpoint, server_name
from relay365.sandbox.tenant import Mailbox
from relay365.sandbox.throttle import SubmissionThrottle

logger = logging.getLogger(__name__)

OUTLOOK_AUDIENCE = "https://outlook.office365.com"

# Replies. 5.7.30: Microsoft's Basic auth retirement announcement (Exchange Team blog, 2024/2026).
BASIC_RETIRED = "550 5.7.30 Basic authentication is not supported for Client Submission."
# 5.7.139 texts as Exchange Online sends them (observed transcripts; aka.ms/smtp_auth_disabled).
TENANT_DISABLED = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. "
    "Visit https://aka.ms/smtp_auth_disabled for more information."
)
MAILBOX_DISABLED = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. "
    "Visit https://aka.ms/smtp_auth_disabled for more information."
)
SECURITY_DEFAULTS = (
    "535 5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults "
    "policy. Contact your administrator."
)
AUTH_FAILED = "535 5.7.3 Authentication unsuccessful"
NOT_AUTHENTICATED = "530 5.7.57 Client not authenticated to send mail."
UNRECOGNIZED_AUTH = "504 5.7.4 Unrecognized authentication type"
# learn.microsoft.com/exchange/troubleshoot/send-emails/smtp-submission-improvements
CONCURRENT = "432 4.3.2 Concurrent connections limit exceeded."
DAILY_QUOTA = "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException"
# At MAIL FROM (Exchange's SMTP layer, hence "SMTP;").
SEND_AS_DENIED = "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
# After DATA, for the From: header (mailbox submission, STOREDRV); observed Exchange Online transcript:
# "554 5.2.252 SendAsDenied; info@... not allowed to send as noreply@...; STOREDRV.Submission.Exception:
# SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due to a permanent exception
# with message [BeginDiagnosticData]Cannot submit message. ..." (5.2.252 also in Microsoft's
# "continuous error throttling for SMTP AUTH" page: "continuous send as denied errors").
HEADER_SEND_AS_DENIED = (
    "554 5.2.252 SendAsDenied; {login} not allowed to send as {sender}; "
    "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process "
    "message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message. "
    "[EndDiagnosticData]"
)
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
# RFC 5321 4.5.3.1.10: "452 4.5.3 Too many recipients" (Exchange receive connector limit).
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
# Sandbox choice (no verbatim Microsoft text found): STOREDRV submission exception form, as for the
# quota; Microsoft's "continuous error throttling" page confirms invalid-license submission errors.
UNLICENSED = (
    "554 5.2.0 STOREDRV.Submission.Exception:InvalidLicenseException; Failed to process message due to "
    "a permanent exception with message Cannot submit message."
)


@dataclass(frozen=True)
class SmtpLogin:
    """Who a submission session authenticated as."""

    mailbox: Mailbox
    method: str  # "XOAUTH2" | "LOGIN"
    app_id: str | None = None

    @property
    def description(self) -> str:
        if self.app_id is not None:
            return f"{self.mailbox.address} (XOAUTH2 app {self.app_id})"
        return f"{self.mailbox.address} ({self.method})"


def _sender_addresses(content: bytes) -> list[str]:
    headers = BytesHeaderParser(policy=compat32).parsebytes(content)
    values = [str(v) for v in headers.get_all("From", [])]
    return [addr.lower() for _, addr in getaddresses(values) if addr]


class SubmissionSMTP(ExchangeSMTP):
    endpoint: ClassVar[str] = "submission"

    def __init__(self, *, ctx: SandboxContext, endpoint: SmtpEndpoint, throttle: SubmissionThrottle,
                 host_name: str, tls_context: ssl.SSLContext) -> None:  # fmt: skip
        self.throttle = throttle
        self.login: SmtpLogin | None = None
        super().__init__(ctx=ctx, host_name=host_name, tls_context=tls_context, on_close=self._session_closed)
        self._endpoint = endpoint

    def _session_closed(self, session: ExchangeSMTP) -> None:
        if self.login is not None:
            self.throttle.release_slot(self.login.mailbox.address, id(self))
        self._endpoint.forget(self)

    def make_ident(self) -> str:
        return f"{super().make_ident()} [{secrets.token_hex(8).upper()}]"

    def ehlo_keywords(self) -> list[str]:
        limits = self.ctx.tenant.limits
        keywords = [f"SIZE {limits.smtp_advertised_size}", "PIPELINING", "DSN", "ENHANCEDSTATUSCODES"]
        keywords.append("AUTH LOGIN XOAUTH2" if self.tls_active else "STARTTLS")
        return [*keywords, "8BITMIME", "BINARYMIME", "CHUNKING", "SMTPUTF8"]

    # -- AUTH ---------------------------------------------------------------------------------

    async def smtp_AUTH(self, arg: str | None) -> None:
        if await self.check_helo_needed("EHLO"):
            return
        assert self.session is not None
        if not self.session.extended_smtp or not self.tls_active:
            # AUTH is not offered before STARTTLS.
            await self.send_reply(UNRECOGNIZED_AUTH)
            return
        if self.session.authenticated:
            await self.push("503 5.5.2 Already authenticated")
            return
        if not arg:
            await self.push("501 5.5.4 Invalid arguments")
            return
        reply = await self.fault("auth")
        if reply is not None:
            await self.send_reply(reply)
            return
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "XOAUTH2":
            reply = await self._auth_xoauth2(initial.strip())
        elif mechanism == "LOGIN":
            reply = await self._auth_login(initial.strip())
        else:
            reply = UNRECOGNIZED_AUTH
        if reply is None:  # the client aborted; aiosmtpd's challenge_auth already answered
            return
        if reply.startswith("235"):
            self.session.authenticated = True
            await self.push(reply)
        else:
            await self.send_reply(reply)

    async def _read_response(self, initial: str, challenge: str) -> bytes | None:
        if initial:
            try:
                return base64.b64decode(initial, validate=True)
            except (binascii.Error, ValueError):
                await self.push("501 5.5.2 Cannot Base64-decode Client responses")
                return None
        answer = await self.challenge_auth(challenge)
        return None if answer is MISSING else bytes(answer)

    def _switch_reply(self, mailbox: Mailbox) -> str | None:
        if mailbox.smtp_auth_disabled is True:
            return MAILBOX_DISABLED
        if mailbox.smtp_auth_disabled is None and self.ctx.tenant.smtp_auth_disabled:
            return TENANT_DISABLED
        return None

    def _success(self, login: SmtpLogin) -> str:
        self.login = login
        logger.info("submission %s authenticated as %s", self.peer_ip, login.description)
        return "235 2.7.0 Authentication successful"

    async def _auth_xoauth2(self, initial: str) -> str | None:
        from relay365.sandbox.tokens import InvalidToken, has_smtp_permission, may_use_mailbox

        raw = await self._read_response(initial, "")
        if raw is None:
            return None
        fields = dict(
            part.split("=", 1) for part in raw.decode("utf-8", "replace").split("\x01") if "=" in part
        )
        user = fields.get("user", "").strip().lower()
        auth = fields.get("auth", "")
        failed = f"{AUTH_FAILED} {self.diag()}"
        if not user or not auth.lower().startswith("bearer "):
            return failed
        try:
            claims = self.ctx.issuer.validate(auth[7:].strip(), audience=OUTLOOK_AUDIENCE)
        except InvalidToken as exc:
            logger.info("submission %s XOAUTH2 for %s refused: %s", self.peer_ip, user, exc.reason)
            return failed
        mailbox = self.ctx.tenant.mailbox(user)
        if mailbox is None or not has_smtp_permission(claims):
            return failed
        if not may_use_mailbox(claims, self.ctx.tenant, mailbox):
            return failed
        switched_off = self._switch_reply(mailbox)
        if switched_off is not None:
            return f"{switched_off} {self.diag()}"
        return self._success(SmtpLogin(mailbox=mailbox, method="XOAUTH2", app_id=claims.app_id))

    async def _auth_login(self, initial: str) -> str | None:
        username = await self._read_response(initial, "Username:")
        if username is None:
            return None
        password = await self._read_response("", "Password:")
        if password is None:
            return None
        tenant = self.ctx.tenant
        if not tenant.basic_auth_allowed:
            return BASIC_RETIRED
        mailbox = tenant.mailbox(username.decode("utf-8", "replace"))
        if (
            mailbox is None
            or mailbox.password is None
            or not secrets.compare_digest(password, mailbox.password.encode("utf-8"))
        ):
            return f"{AUTH_FAILED} {self.diag()}"
        if tenant.security_defaults:
            return f"{SECURITY_DEFAULTS} {self.diag()}"
        switched_off = self._switch_reply(mailbox)
        if switched_off is not None:
            return f"{switched_off} {self.diag()}"
        return self._success(SmtpLogin(mailbox=mailbox, method="LOGIN"))

    # -- transaction --------------------------------------------------------------------------

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:  # fmt: skip
        reply = await self.fault("mail")
        if reply is not None:
            return self.reject(reply)
        if self.login is None:
            return self.reject(f"{NOT_AUTHENTICATED} {self.diag()}")
        if not self.throttle.acquire_slot(self.login.mailbox.address, id(self)):
            return self.reject(
                f"{CONCURRENT} Visit https://aka.ms/concurrent_sending for more information. "
                f"[Hostname={self.hostname}]"
            )
        if address and not self._may_send_as(self.login, address):
            return self.reject(SEND_AS_DENIED)
        for option in mail_options:
            name, _, value = option.partition("=")
            if name == "SIZE" and value.isdigit() and int(value) > self.ctx.tenant.limits.max_message_size:
                return self.reject(TOO_BIG)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:  # fmt: skip
        reply = await self.fault("rcpt")
        if reply is not None:
            return self.reject(reply)
        if len(envelope.rcpt_tos) >= self.ctx.tenant.limits.max_recipients_per_message:
            return self.reject(TOO_MANY_RECIPIENTS)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    def _may_send_as(self, login: SmtpLogin, address: str) -> bool:
        address = address.lower()
        granted = {a.lower() for a in login.mailbox.send_as}
        return address == login.mailbox.address.lower() or address in granted

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await self.fault("after_data")
        if reply is not None:
            return self.reject(reply)
        login = self.login
        assert login is not None  # MAIL FROM was refused otherwise
        content: bytes = envelope.original_content
        limits = self.ctx.tenant.limits
        if len(content) > limits.max_message_size:
            return self.reject(TOO_BIG)
        for sender in _sender_addresses(content):
            if not self._may_send_as(login, sender):
                return self.reject(HEADER_SEND_AS_DENIED.format(login=login.mailbox.address, sender=sender))
        if not login.mailbox.licensed and not login.mailbox.shared:
            return self.reject(UNLICENSED)
        recipients = list(envelope.rcpt_tos)
        if self.throttle.recipients_left_today(login.mailbox.address) < len(recipients):
            return self.reject(DAILY_QUOTA)
        deferred = 0.0
        if self.throttle.record_message(login.mailbox.address, len(recipients)):
            self.ctx.store.count_rejection(self.endpoint, "throttled")
            deferred = float(limits.submission_window_seconds)  # carried over to the following minute
        accepted = self.ctx.mailflow.accept(
            Submission(
                endpoint=self.endpoint,
                mail_from=envelope.mail_from or "",
                recipients=tuple(recipients),
                content=content,
                authenticated_as=login.description,
                client_ip=self.ctx.tenant.public_ip(self.peer_ip),
                helo=str(getattr(session, "host_name", "") or ""),
                sent_items_mailbox=login.mailbox.address,
                deferred_seconds=deferred,
            )
        )
        return f"250 2.0.0 OK {accepted.message_id} [Hostname={self.hostname}]"


def submission_endpoint(ctx: SandboxContext) -> SmtpEndpoint:
    """The submission endpoint (not yet listening; call ``start``)."""
    throttle = ctx.sending
    host_name = server_name("outlook.office365.com")
    tls_context = ctx.tls.server_context()

    def factory(endpoint: SmtpEndpoint) -> ExchangeSMTP:
        return SubmissionSMTP(
            ctx=ctx, endpoint=endpoint, throttle=throttle, host_name=host_name, tls_context=tls_context
        )

    return SmtpEndpoint(name="submission", factory=factory)
