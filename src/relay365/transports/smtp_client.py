"""What every SMTP-speaking transport shares: a pool of reusable aiosmtplib sessions and the one place
where upstream SMTP replies and client errors become delivered / transient / permanent.

aiosmtplib errors are mapped to relay365's own at this boundary, like httpx maps its backends' errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiosmtplib
from aiosmtplib import SMTPResponse

from relay365.errors import PermanentDeliveryError, TransientDeliveryError
from relay365.transports.base import OutboundMessage, Outcome, RecipientResult
from relay365.transports.replies import is_transient_reply

log = logging.getLogger(__name__)
IDLE_REUSE_SECONDS = 10.0  # Postfix smtp_connection_cache_time_limit is 2 s; Exchange idles out later


def classify(code: int, text: str) -> Outcome:
    """The one transient/permanent decision for SMTP replies (RFC 5321 4.2.1: 4yz transient)."""
    if 200 <= code < 300:
        return Outcome.DELIVERED
    return Outcome.TRANSIENT if is_transient_reply(code, text) else Outcome.PERMANENT


def reply_text(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}"


def raise_for_reply(code: int, message: str) -> None:
    reply = reply_text(code, message)
    if classify(code, message) is Outcome.TRANSIENT:
        raise TransientDeliveryError(reply)
    raise PermanentDeliveryError(reply, code=code)


SessionFactory = Callable[[], Awaitable[aiosmtplib.SMTP]]


class SessionPool:
    """At most ``max_sessions`` upstream sessions at once; an idle one is reused for the next message."""

    def __init__(self, factory: SessionFactory, *, max_sessions: int) -> None:
        self._factory = factory
        self._slots = asyncio.Semaphore(max_sessions)
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[tuple[aiosmtplib.SMTP, bool]]:
        """Yield (session, reused)."""
        async with self._slots:
            smtp, reused = None, False
            while self._idle and smtp is None:
                candidate, since = self._idle.pop()
                if candidate.is_connected and time.monotonic() - since < IDLE_REUSE_SECONDS:
                    smtp, reused = candidate, True
                else:
                    await _quit(candidate)
            if smtp is None:
                smtp = await self._factory()
            ok = False
            try:
                yield smtp, reused
                ok = True
            finally:
                if ok and smtp.is_connected:
                    self._idle.append((smtp, time.monotonic()))
                else:
                    smtp.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(s) for s, _ in idle))


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    try:
        if smtp.is_connected:
            await asyncio.wait_for(smtp.quit(), 5)
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        pass
    finally:
        smtp.close()


def _results(rcpts: tuple[str, ...], errors: dict[str, SMTPResponse], final: str) -> list[RecipientResult]:
    out = []
    for r in rcpts:
        if r in errors:
            e = errors[r]
            out.append(RecipientResult(r, classify(e.code, e.message), reply_text(e.code, e.message)))
        else:
            out.append(RecipientResult(r, Outcome.DELIVERED, final))
    return out


async def send_over(pool: SessionPool, message: OutboundMessage, *, upstream: str) -> list[RecipientResult]:
    """Send one message through a pooled session, retrying once on a stale reused session.

    The body is read only once the upstream has accepted a recipient: a delivery waiting for a pool
    slot, or failing to connect, never holds the message in memory.
    """
    body: bytes | None = None
    options = ["SMTPUTF8"] if message.smtputf8 else []
    for attempt in (1, 2):
        data_started = False
        try:
            async with pool.session() as (smtp, reused):
                try:
                    errors = await _envelope(smtp, message, options)
                    if len(errors) == len(message.rcpt_tos):
                        await _rset(smtp)
                        return _results(message.rcpt_tos, errors, "")
                    if body is None:
                        body = await asyncio.to_thread(message.read_body)
                    data_started = True
                    response = await smtp.data(body)
                except aiosmtplib.SMTPResponseException as e:
                    await _rset(smtp)
                    raise_for_reply(e.code, e.message)
                except aiosmtplib.SMTPServerDisconnected:
                    if reused and not data_started and attempt == 1:
                        log.debug(
                            "%s: reused session to %s was closed; reconnecting", message.queue_id, upstream
                        )
                        continue
                    raise
            return _results(message.rcpt_tos, errors, reply_text(response.code, response.message))
        except aiosmtplib.SMTPAuthenticationError as e:
            # A credential or token problem is the admin's to fix; mail waits (reliability.md).
            log.critical("ALERT %s: authentication refused: %s", upstream, reply_text(e.code, e.message))
            raise TransientDeliveryError(f"454 4.7.0 {upstream}: {reply_text(e.code, e.message)}") from e
        except aiosmtplib.SMTPConnectResponseError as e:
            # A 5xx greeting says nothing about this message: the server will not talk to us now.
            # Postfix skips such a server (smtp_skip_5xx_greeting = yes; bouncing "appears to
            # contradict RFC 2821"), so the mail waits instead of the whole queue bouncing.
            raise TransientDeliveryError(
                f"451 4.4.1 {upstream} greeted with {reply_text(e.code, e.message)}"
            ) from e
        except aiosmtplib.SMTPResponseException as e:  # EHLO or STARTTLS refused
            raise_for_reply(e.code, e.message)
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ssl.SSLError) as e:
            if data_started:
                log.warning(
                    "%s: %s lost after DATA began; the upstream may have it already, a retry"
                    " can duplicate it",
                    message.queue_id,
                    upstream,
                )
            raise TransientDeliveryError(f"451 4.4.1 {upstream}: {type(e).__name__}: {e}") from e
    raise TransientDeliveryError(f"451 4.4.1 {upstream}: connection closed")


async def _envelope(
    smtp: aiosmtplib.SMTP, message: OutboundMessage, options: list[str]
) -> dict[str, SMTPResponse]:
    """MAIL FROM and every RCPT TO; returns the refused recipients (partial acceptance)."""
    encoding = "utf-8" if message.smtputf8 else "ascii"
    await smtp.mail(message.mail_from, options=options, encoding=encoding)
    errors: dict[str, SMTPResponse] = {}
    for rcpt in message.rcpt_tos:
        try:
            await smtp.rcpt(rcpt, encoding=encoding)
        except aiosmtplib.SMTPRecipientRefused as e:
            errors[rcpt] = SMTPResponse(e.code, e.message)
    return errors


async def _rset(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.rset()
    except (aiosmtplib.SMTPException, OSError):
        smtp.close()
