"""What both sandbox SMTP endpoints share: Exchange Online's session texts, faults, TLS, lifecycle.

Built on aiosmtpd 1.4.6's ``SMTP`` protocol (through ``relay365.ingress.compat``, which holds every use
of its internals), one instance per connection, served by
``loop.create_server`` on the caller's event loop. Texts follow Exchange Online transcripts:
banner ``220 <host> Microsoft ESMTP MAIL Service ready at <RFC 5322 date>``, ``EHLO`` answered with
``250-<host> Hello [<ip>]``, ``STARTTLS`` answered with ``220 2.0.0 SMTP server ready``,
``250 2.1.0 Sender OK``, ``250 2.1.5 Recipient OK``, ``221 2.0.0 Service closing transmission channel``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import secrets
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, cast

from aiosmtpd.smtp import TLSSetupException, syntax

from relay365.ingress.compat import CompatSMTP
from relay365.sandbox.context import SandboxContext
from relay365.sandbox.mx_tls import LenientClientCertContext

logger = logging.getLogger(__name__)

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# MAIL/RCPT parameters of the extensions Exchange advertises (RFC 3461 DSN, RFC 4954 AUTH=) that
# aiosmtpd itself does not know; accepted and ignored by the sandbox.
_MAIL_EXTRA_PARAMS = ("RET", "ENVID", "AUTH")
_RCPT_EXTRA_PARAMS = ("NOTIFY", "ORCPT")
AUTH_LINE_LIMIT = 12288
# aiosmtpd's own texts, as Exchange (Server and Online) words them.
_EXCHANGE_TEXTS = {
    "354 End data with <CR><LF>.<CR><LF>": "354 Start mail input; end with <CRLF>.<CRLF>",
    "503 Error: need MAIL command": "503 5.5.2 Need mail command",
    "503 Error: need RCPT command": "503 5.5.2 Need rcpt command",
    "503 Error: send HELO first": "503 5.5.2 Send hello first",
    "503 Error: send EHLO first": "503 5.5.2 Send hello first",
    "503 Error: nested MAIL command": "503 5.5.2 Sender already specified",
    "500 Error: bad syntax": "500 5.3.3 Unrecognized command",
    "553 5.1.3 Error: malformed address": "501 5.1.7 Invalid address",
}
_UNRECOGNIZED = re.compile(r'500 Error: command "(.*)" not recognized')


def exchange_date(when: float) -> str:
    """``Thu, 5 Nov 2026 10:51:20 +0000``, the date form of Exchange banners."""
    moment = datetime.fromtimestamp(when, UTC)
    return (
        f"{_DAYS[moment.weekday()]}, {moment.day} {_MONTHS[moment.month - 1]} {moment.year} "
        f"{moment:%H:%M:%S} +0000"
    )


def server_name(suffix: str) -> str:
    """A front-end server name like Exchange's ``SJ5PEPF000001F2.mail.protection.outlook.com``."""
    return f"SB{secrets.token_hex(2).upper()}PR01CA{secrets.randbelow(10000):04d}.{suffix}"


def reply_code(reply: str) -> str:
    """``"550 5.7.60"`` from ``"550 5.7.60 SMTP; Client does not ..."`` (the rejection counter key)."""
    parts = reply.split()
    if len(parts) >= 2 and re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", parts[1]):
        return f"{parts[0]} {parts[1]}"
    return parts[0] if parts else reply


def _strip_params(arg: str, names: tuple[str, ...]) -> str:
    kept = [p for p in arg.split(" ") if p.split("=", 1)[0].upper() not in names]
    return " ".join(kept)


class ExchangeSMTP(CompatSMTP):
    """One SMTP session of a sandbox endpoint (aiosmtpd protocol with Exchange Online texts)."""

    endpoint: ClassVar[str] = ""
    # RFC 4954 section 4: an AUTH command line (an XOAUTH2 initial response carries a whole JWT) may be
    # 12288 octets; aiosmtpd's 1001-octet line limit would cut it. DATA lines get the same limit.
    line_length_limit = AUTH_LINE_LIMIT
    command_size_limit = AUTH_LINE_LIMIT  # before EHLO (then per-command limits apply)

    def __init__(self, *, ctx: SandboxContext, host_name: str,
                 tls_context: ssl.SSLContext | LenientClientCertContext | None,
                 on_close: Callable[[ExchangeSMTP], None]) -> None:  # fmt: skip
        self.ctx = ctx
        self._on_close = on_close
        self._bdat = bytearray()  # BDAT chunks of the current transaction (RFC 3030)
        self._bdat_started = False
        self._bdat_failed: str | None = None
        self._binarymime = False
        super().__init__(
            self,
            hostname=host_name,
            ident=self.make_ident(),
            # The MX endpoint's LenientClientCertContext is duck-typed for asyncio's sslproto (mx_tls).
            tls_context=cast(ssl.SSLContext | None, tls_context),
            data_size_limit=None,
            enable_SMTPUTF8=True,
            decode_data=False,
            auth_require_tls=True,
            auth_exclude_mechanism=["LOGIN", "PLAIN"],
            loop=asyncio.get_running_loop(),
        )
        # aiosmtpd keeps command_size_limits on the class (shared); give this session its own.
        self.command_size_limits = collections.defaultdict(lambda: 512)  # RFC 5321 4.5.3.1.4
        self.command_size_limits.update({"AUTH": AUTH_LINE_LIMIT, "MAIL": 1024, "RCPT": 1024})

    # -- hooks for subclasses -----------------------------------------------------------------

    def make_ident(self) -> str:
        return f"Microsoft ESMTP MAIL Service ready at {exchange_date(self.ctx.clock.now())}"

    def ehlo_keywords(self) -> list[str]:
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------

    @property
    def peer_ip(self) -> str:
        peer = self.session.peer if self.session is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else ""

    def diag(self) -> str:
        """The ``[host timestamp id]`` trailer Exchange puts on authentication replies."""
        stamp = datetime.fromtimestamp(self.ctx.clock.now(), UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        return f"[{self.hostname} {stamp}Z {secrets.token_hex(8).upper()}]"

    def reject(self, reply: str) -> str:
        """Count a rejection (4xx/5xx) and give the reply back for the caller to send."""
        if reply[:1] in {"4", "5"}:
            self.ctx.store.count_rejection(self.endpoint, reply_code(reply))
            logger.info("%s %s rejected: %s", self.endpoint, self.peer_ip, reply)
        return reply

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            unknown = _UNRECOGNIZED.fullmatch(status)
            if unknown is not None:
                status = f"500 5.3.3 Unrecognized command '{unknown.group(1)}'"
            await super().push(_EXCHANGE_TEXTS.get(status, status))
            if status.startswith("421") and self.transport is not None:
                self.transport.close()  # RFC 5321 3.8: 421 closes the transmission channel
        else:
            await super().push(status)

    async def send_reply(self, reply: str) -> None:
        await self.push(self.reject(reply))

    def abort_connection(self) -> None:
        raw = self.raw_transport
        if isinstance(raw, asyncio.WriteTransport):
            raw.abort()

    async def fault(self, stage: str) -> str | None:
        """Apply an injected fault for this stage: returns a reply to send, or None to go on."""
        fault = self.ctx.faults.take(self.endpoint, stage)
        if fault is None:
            return None
        logger.info("%s fault at %s: %s", self.endpoint, stage, fault.action)
        if fault.stall_seconds:
            await asyncio.sleep(fault.stall_seconds)
        if fault.action == "drop":
            self.ctx.store.count_rejection(self.endpoint, f"drop {stage}")
            self.abort_connection()
            raise asyncio.CancelledError
        return fault.reply if fault.action == "reply" or fault.reply else None

    # -- lifecycle ----------------------------------------------------------------------------

    async def before_greeting(self) -> bool:
        reply = await self.fault("connect")
        if reply is not None:
            await self.send_reply(reply)
            if self.transport is not None:
                self.transport.close()
            return False
        return True

    def connection_lost(self, error: Exception | None) -> None:
        self._on_close(self)
        super().connection_lost(error)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # counted in smtp_STARTTLS; aiosmtpd closes the connection
            logger.info("%s TLS handshake with %s failed: %s", self.endpoint, self.peer_ip, error.__cause__)
            return "454 4.7.0 TLS negotiation failed"
        logger.exception("%s session error with %s", self.endpoint, self.peer_ip, exc_info=error)
        return self.reject("451 4.7.0 Temporary server error. Please try again later. PRX4")

    # -- commands whose texts differ from aiosmtpd's -------------------------------------------

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:  # fmt: skip
        reply = await self.fault("ehlo")
        if reply is not None:
            await self.send_reply(reply)
            return []
        session.host_name = hostname
        keywords = self.ehlo_keywords()
        lines = [f"250-{self.hostname} Hello [{self.peer_ip}]"]
        lines += [f"250-{k}" for k in keywords[:-1]]
        lines.append(f"250 {keywords[-1]}")
        return lines

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        reply = await self.fault("ehlo")
        if reply is not None:
            return self.reject(reply)
        session.host_name = hostname
        return f"250 {self.hostname} Hello [{self.peer_ip}]"

    async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: str) -> str:
        return "250 2.0.0 OK"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 Resetting"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        return "221 2.0.0 Service closing transmission channel"

    async def smtp_MAIL(self, arg: str | None) -> None:
        binary = bool(arg) and "BODY=BINARYMIME" in (arg or "").upper().split()
        if arg:
            arg = _strip_params(arg, _MAIL_EXTRA_PARAMS + (("BODY",) if binary else ()))
        await super().smtp_MAIL(arg)
        if self.envelope is not None and self.envelope.mail_from:
            self._binarymime = binary

    async def smtp_RCPT(self, arg: str | None) -> None:
        await super().smtp_RCPT(_strip_params(arg, _RCPT_EXTRA_PARAMS) if arg else arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if self.envelope is not None and self.envelope.rcpt_tos and not arg:
            reply = await self.fault("data")
            if reply is not None:
                await self.send_reply(reply)
                return
        if self._binarymime and self.envelope is not None and self.envelope.mail_from:
            await self.push("503 5.5.1 Bad sequence of commands; BODY=BINARYMIME needs BDAT")
            return
        await super().smtp_DATA(arg)

    @syntax("BDAT chunk-size [LAST]")
    async def smtp_BDAT(self, arg: str | None) -> None:
        """RFC 3030 CHUNKING: ``BDAT <size> [LAST]``, then exactly <size> octets."""
        parts = (arg or "").split()
        if (
            not parts
            or not parts[0].isdigit()
            or len(parts) > 2
            or (len(parts) == 2 and parts[1].upper() != "LAST")
        ):
            await self.push("501 5.5.4 Invalid arguments")
            return
        size, last = int(parts[0]), len(parts) == 2
        chunk = await self.reader.readexactly(size)  # read even when refusing (RFC 3030 section 4)
        envelope = self.envelope
        if await self.check_helo_needed() or envelope is None:
            return
        if not envelope.rcpt_tos:
            self._bdat.clear()
            await self.push("503 5.5.1 Bad sequence of commands")
            return
        if not self._bdat_started:
            self._bdat_started = True
            reply = await self.fault("data")
            if reply is not None:
                self._bdat_failed = reply
        if len(self._bdat) + size <= AUTH_LINE_LIMIT + self.ctx.tenant.limits.max_message_size:
            self._bdat.extend(chunk)
        if not last:
            await self.push(f"250 2.0.0 BDAT {size} octets received")
            return
        content = bytes(self._bdat)
        failed = self._bdat_failed
        self._bdat.clear()
        self._bdat_started, self._bdat_failed = False, None
        if failed is not None:
            self.reset_after_data()
            await self.send_reply(failed)
            return
        envelope.content = envelope.original_content = content
        status = await self.call_handler_hook("DATA")
        self.reset_after_data()
        await self.push(status)

    def transaction_reset(self) -> None:
        self._bdat = bytearray()
        self._bdat_started = False
        self._bdat_failed = None
        self._binarymime = False

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            await self.push("501 5.5.4 Invalid arguments")
            return
        if not self.tls_context or self.tls_active:
            await self.push("503 5.5.2 Only one STARTTLS command can be issued per session")
            return
        reply = await self.fault("starttls")
        if reply is not None:
            await self.send_reply(reply)
            return
        await self.push("220 2.0.0 SMTP server ready")
        try:
            await self.start_tls()
        except TLSSetupException:
            self.ctx.store.count_rejection(self.endpoint, "tls handshake")
            raise


class SmtpEndpoint:
    """A listening SMTP endpoint on the running loop, closing every live session on ``close()``."""

    def __init__(self, *, name: str, factory: Callable[[SmtpEndpoint], ExchangeSMTP]) -> None:
        self.name = name
        self._factory = factory
        self._server: asyncio.Server | None = None
        self.sessions: set[ExchangeSMTP] = set()
        self.port = 0

    def _create(self) -> ExchangeSMTP:
        session = self._factory(self)
        self.sessions.add(session)
        return session

    def forget(self, session: ExchangeSMTP) -> None:
        self.sessions.discard(session)

    async def start(self, *, host: str, port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._create, host=host, port=port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        logger.info("sandbox %s endpoint listening on %s:%d", self.name, host, self.port)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = []
        for session in list(self.sessions):
            session.abort_connection()
            task = session.session_task
            if task is not None:
                task.cancel()
                tasks.append(task)
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
