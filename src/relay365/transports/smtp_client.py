"""What every SMTP-speaking transport shares: a pool of reusable aiosmtplib sessions and the one place
where upstream SMTP replies and client errors become delivered / transient / permanent.

aiosmtplib errors are mapped to relay365's own at this boundary, like httpx maps its backends' errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiosmtplib
from aiosmtplib import SMTPResponse

from relay365.errors import (
    ConnectionLostError,
    PermanentDeliveryError,
    TransientDeliveryError,
    UpstreamUnreachableError,
)
from relay365.transports.base import OutboundMessage, Outcome, RecipientResult
from relay365.transports.replies import is_transient_reply
from relay365.transports.transaction import Progress, transaction

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

    The transaction is ``transaction.transaction``: pipelined where the upstream offers it, the body
    sent from the spool as it lies, only once the upstream has accepted a recipient (a delivery
    waiting for a pool slot, or failing to connect, never reads the message).
    """
    whole = message
    for attempt in (1, 2):
        progress = Progress()
        connected = False
        try:
            async with pool.session() as (smtp, reused):
                connected = True
                message, refused = await _smtputf8_plan(smtp, whole, upstream)
                if not message.rcpt_tos:
                    return refused
                options = ["SMTPUTF8"] if message.smtputf8 else []
                try:
                    await _ehlo_or_helo(smtp)
                    sent = await transaction(
                        smtp,
                        mail_from=message.mail_from,
                        rcpts=message.rcpt_tos,
                        options=options,
                        body=message.body,
                        progress=progress,
                    )
                    if sent.reply is None:  # every recipient refused: nothing was sent
                        await _rset(smtp)
                        return _results(message.rcpt_tos, sent.refused, "") + refused
                except aiosmtplib.SMTPResponseException as e:
                    await _rset(smtp)
                    raise_for_reply(e.code, e.message)
                except aiosmtplib.SMTPServerDisconnected:
                    if reused and not progress.data_started and attempt == 1:
                        log.debug(
                            "%s: reused session to %s was closed; reconnecting", message.queue_id, upstream
                        )
                        continue
                    raise
            assert sent.reply is not None
            final = reply_text(sent.reply.code, sent.reply.message)
            return _results(message.rcpt_tos, sent.refused, final) + refused
        except aiosmtplib.SMTPAuthenticationError as e:
            # A credential or token problem is the admin's to fix; mail waits (reliability.md).
            log.critical("ALERT %s: authentication refused: %s", upstream, reply_text(e.code, e.message))
            raise TransientDeliveryError(f"454 4.7.0 {upstream}: {reply_text(e.code, e.message)}") from e
        except aiosmtplib.SMTPConnectResponseError as e:
            # A 5xx greeting says nothing about this message: the server will not talk to us now.
            # Postfix skips such a server (smtp_skip_5xx_greeting = yes; bouncing "appears to
            # contradict RFC 2821"), so the mail waits instead of the whole queue bouncing.
            raise UpstreamUnreachableError(
                f"451 4.4.1 {upstream} greeted with {reply_text(e.code, e.message)}"
            ) from e
        except aiosmtplib.SMTPResponseException as e:  # EHLO or STARTTLS refused
            raise_for_reply(e.code, e.message)
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ssl.SSLError) as e:
            if not connected:  # RFC 3463 X.4.1: no answer from host
                raise UpstreamUnreachableError(f"451 4.4.1 {upstream}: {type(e).__name__}: {e}") from e
            if progress.data_started:
                log.warning(
                    "%s: %s lost after DATA began; the upstream may have it already, a retry"
                    " can duplicate it",
                    message.queue_id,
                    upstream,
                )
            # RFC 3463 X.4.2: bad connection (established, then lost before the transaction ended)
            raise ConnectionLostError(f"451 4.4.2 {upstream}: {type(e).__name__}: {e}") from e
    raise ConnectionLostError(f"451 4.4.2 {upstream}: connection closed")


async def _ehlo_or_helo(smtp: aiosmtplib.SMTP) -> None:
    """EHLO (then HELO if EHLO is refused) unless the session has greeted already (RFC 5321 4.1.1.1)."""
    if not smtp.is_ehlo_or_helo_needed:
        return
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not smtp.is_connected:
            raise
        await smtp.helo()


async def _smtputf8_plan(
    smtp: aiosmtplib.SMTP, message: OutboundMessage, upstream: str
) -> tuple[OutboundMessage, list[RecipientResult]]:
    """RFC 6531 3.4: a message with a non-ASCII address (or sent with SMTPUTF8) goes with SMTPUTF8
    when the upstream offers it. When it does not, what needs it is refused here, for good (5.6.7,
    one DSN; never an attempt that fails every cool-down): all of it if the sender or the header
    section is non-ASCII, else the non-ASCII recipients, the others going without SMTPUTF8 (like
    Postfix, which bounces only mail whose envelope or headers need it). Returns what to send and
    the recipients refused."""
    addresses = (message.mail_from, *message.rcpt_tos)
    utf8 = message.smtputf8 or not all(a.isascii() for a in addresses)
    if utf8 and smtp.is_ehlo_or_helo_needed:
        await smtp.ehlo()  # the extensions are known from EHLO on
    if not utf8 or smtp.supports_extension("smtputf8"):
        return dataclasses.replace(message, smtputf8=utf8), []
    reply = f"553 5.6.7 {upstream} does not offer SMTPUTF8, which this message needs (RFC 6531)"
    if message.mail_from.isascii() and _head_is_ascii(await message.body.head(1 << 20)):
        refuse = [r for r in message.rcpt_tos if not r.isascii()]
    else:
        refuse = list(message.rcpt_tos)
    rest = tuple(r for r in message.rcpt_tos if r not in refuse)
    results = [RecipientResult(r, Outcome.PERMANENT, reply) for r in refuse]
    return dataclasses.replace(message, rcpt_tos=rest, smtputf8=False), results


def _head_is_ascii(head: bytes) -> bool:
    """``head``: the first MiB, more than any header section the ingress accepts."""
    end = head.find(b"\r\n\r\n")
    return (head if end < 0 else head[:end]).isascii()


async def _rset(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.rset()
    except (aiosmtplib.SMTPException, OSError):
        smtp.close()
