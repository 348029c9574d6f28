"""The device-facing SMTP server: aiosmtpd 1.4.6 with the holes a production relay must close.

aiosmtpd gives the command loop, STARTTLS (with the RFC 3207 buffer discard) and the command syntax;
it is reached through ``compat`` (the one module that touches its internals). This subclass adds what
it lacks: connection caps (421 4.7.0), checked command lines (``lines``),
device identity (IP, AUTH, client certificate), case-insensitive AUTH PLAIN/LOGIN with brute-force
protection, per-device policy, the null sender, a recipient limit, a streaming DATA that checks the
header section and writes to the spool as it arrives, refuses bare CR/LF/NUL, and answers 250 only
after the spool's fsync, one log line and one count for every 4xx/5xx it answers, and a 421 to every
open session on shutdown. Delivery never happens here.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from typing import AnyStr

from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session, TLSSetupException

from relay365.errors import CommandRefused, MessageRefused, SpoolError, SpoolFullError
from relay365.ingress import auth, observe, policy
from relay365.ingress.compat import CompatHandler, CompatSMTP, SessionReader
from relay365.ingress.context import IngressContext
from relay365.ingress.data import DataParser
from relay365.ingress.facts import HeaderFacts
from relay365.ingress.headers import HeaderEditor, received_field
from relay365.ingress.identity import DeviceDirectory, PeerCertificate, peer_certificate
from relay365.ingress.lines import SHUTTING_DOWN, CommandReader
from relay365.settings import NULL_SENDER, DeviceSettings, ListenerSettings
from relay365.spool.model import Envelope, IncomingMessage

log = logging.getLogger(__name__)
CHUNK = 1 << 16


def log_refusal(
    *, peer: str, device: str, listener: str, command: str, reply: str, detail: str = "", level: int
) -> None:
    """The one log line of a 4xx/5xx answered to a device."""
    log.log(
        level,
        "refused peer=%s device=%s listener=%s command=%s reply=%r%s",
        peer,
        device,
        listener,
        command,
        reply,
        f" {detail}" if detail else "",
    )


class _Hooks(CompatHandler):
    """aiosmtpd calls these after its own syntax checks; the verdicts come from ``policy``."""

    async def handle_MAIL(
        self, server: RelaySMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        return server.on_mail(envelope, address, options)

    async def handle_RCPT(
        self, server: RelaySMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        return server.on_rcpt(envelope, address, options)


class RelaySMTP(CompatSMTP):
    # The stream reader's limit doubles as the DATA chunk buffer; command lines are still held to
    # 512 octets (RFC 5321 4.5.3.1.4) by aiosmtpd's command_size_limit after the read.
    line_length_limit = CHUNK

    def __init__(
        self, ctx: IngressContext, listener: ListenerSettings, tls_context: ssl.SSLContext | None
    ) -> None:
        starttls = tls_context if listener.tls in ("starttls", "starttls-required") else None
        super().__init__(
            _Hooks(),
            hostname=ctx.hostname,
            ident="relay365 ESMTP",
            tls_context=starttls,
            require_starttls=listener.tls == "starttls-required",
            timeout=listener.idle_timeout,
            data_size_limit=listener.max_message_size,
            enable_SMTPUTF8=True,
            loop=asyncio.get_running_loop(),
        )
        # RFC 5321 4.5.3.1.4: 512 octets per command line, plus room for SIZE, SMTPUTF8 and BODY.
        self.command_size_limits = collections.defaultdict(lambda: 512, {"MAIL": 512 + 26 + 10 + 20})
        self.ctx = ctx
        self.listener = listener
        self.peer_ip = ""
        self._admitted = False
        self._rejected = False
        self._implicit_tls = listener.tls == "implicit"
        self.ip_device: DeviceSettings | None = None
        self.cert_device: DeviceSettings | None = None
        self.login_device: DeviceSettings | None = None
        self._cert: PeerCertificate | None = None
        self._directory: DeviceDirectory | None = None  # the device table the devices above came from
        self._raw_arg = ""
        self._lines: CommandReader | None = None
        self._close_after_reply = False
        self._detail = ""  # what the next refusal's log line adds (the user tried, the reason, ...)
        self._detail_level = logging.WARNING
        self._facts = HeaderFacts()
        self._rcpt_arg = ""  # the RCPT argument being answered (refusals name the recipient)

    # -- connection ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._admitted and not self.starttls_started:
            peer = transport.get_extra_info("peername") or ("", 0)
            self.peer_ip = str(peer[0])
            if self.ctx.closing:
                reason: str | None = SHUTTING_DOWN
            else:
                reason = self.ctx.limiter.admit(self.peer_ip)
            if reason is not None:
                self._rejected = True
                device = self.ctx.devices.by_ip(self.peer_ip, self.listener.name)
                log_refusal(
                    peer=self.peer_ip,
                    device=device.name if device else "-",
                    listener=self.listener.name,
                    command="CONNECT",
                    reply=reason,
                    level=logging.WARNING,
                )
                assert isinstance(transport, asyncio.WriteTransport)
                self.ctx.metrics.refusal(reason)
                self._track_refusal(reason)
                transport.write(reason.encode() + b"\r\n")
                transport.close()
                return
            self._admitted = True
            self.ctx.sessions.add(self)
            self._directory = self.ctx.devices
            self.ip_device = self._directory.by_ip(self.peer_ip, self.listener.name)
            self._seen(self.ip_device)
        super().connection_made(transport)
        if self.tls_active:
            self._identify_certificate(transport)

    def reader_connected(self, reader: SessionReader) -> None:
        # Before aiosmtpd reads the first command line from it: command lines are checked (``lines``).
        self._lines = CommandReader.adopt(reader, bare_newlines=self.listener.bare_newlines)

    def connection_lost(self, error: Exception | None) -> None:
        if self._rejected:
            return
        if self._admitted:
            self._admitted = False
            self.ctx.limiter.release(self.peer_ip)
            self.ctx.forget(self)
        super().connection_lost(error)

    def _identify_certificate(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return
        self.sess().ssl = {"cipher": ssl_object.cipher(), "version": ssl_object.version()}
        cert = peer_certificate(ssl_object.getpeercert(binary_form=True), ssl_object.getpeercert())
        if cert is not None:
            self._cert = cert
            self.cert_device = self.ctx.devices.by_certificate(cert, self.listener.name)
            log.info(
                "client certificate peer=%s subject=%s device=%s",
                self.peer_ip,
                cert.subject,
                self.cert_device.name if self.cert_device else "-",
            )

    def sess(self) -> Session:
        assert self.session is not None
        return self.session

    def env(self) -> SmtpEnvelope:
        assert self.envelope is not None
        return self.envelope

    def lines(self) -> CommandReader:
        assert self._lines is not None
        return self._lines

    @property
    def tls_active(self) -> bool:
        return self._implicit_tls or super().tls_active

    @property
    def offers_auth(self) -> bool:
        return self.listener.auth and (self.tls_active or self.listener.allow_plaintext_auth)

    def device(self) -> DeviceSettings | None:
        return self.login_device or self.cert_device or self.ip_device

    def _identify_again(self) -> None:
        """At MAIL after a reload, the device by the new table (README, "Reload"): a removed device, or
        one whose password changed, starts no new transaction; a login that no longer holds is undone."""
        directory = self.ctx.devices
        if directory is self._directory:
            return
        self._directory, name = directory, self.listener.name
        self.ip_device = directory.by_ip(self.peer_ip, name)
        if self._cert is not None:
            self.cert_device = directory.by_certificate(self._cert, name)
        if self.login_device is not None:
            login = directory.login_still_valid(self.login_device, name)
            if login is None:
                log.info("login of %s peer=%s void after the reload", self.login_device.name, self.peer_ip)
                self.sess().authenticated = False
            self.login_device = login

    def _protocol(self) -> str:
        return "ESMTP" + ("S" if self.tls_active else "") + ("A" if self.login_device else "")

    # -- replies: every 4xx/5xx gets an enhanced status code, one log line and a count -------------
    def _note(self, detail: str, level: int = logging.WARNING) -> None:
        """Detail for the log line of the refusal about to be sent."""
        self._detail, self._detail_level = detail, level

    def _refused(self, reply: str, command: str | None = None) -> None:
        device = self.device()
        detail, level = self._detail, self._detail_level
        self._detail, self._detail_level = "", logging.WARNING
        log_refusal(
            peer=self.peer_ip,
            device=device.name if device else "-",
            listener=self.listener.name,
            command=command or (self._lines.command if self._lines else "-"),
            reply=reply,
            detail=detail,
            level=level,
        )
        self.ctx.metrics.refusal(reply)

    async def push(self, status: AnyStr) -> None:
        reply = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        if reply[:1] in ("4", "5"):
            reply = policy.with_status(reply)
            self._refused(reply)
            self._track_refusal(reply)
        await super().push(reply)
        if self._close_after_reply and self.transport is not None:
            self.transport.close()

    # -- the tracking log and device activity (ingress/observe.py) -------------------------------
    def _seen(self, device: DeviceSettings | None) -> None:
        tls = observe.tls_version(self.transport)
        self.ctx.activity.seen(
            device.name if device else None,
            address=self.peer_ip,
            listener=self.listener.name,
            tls_version=tls,
        )

    def _track_refusal(self, reply: str) -> None:
        device, env = self.device(), self.envelope
        every = ",".join(env.rcpt_tos) if env is not None else ""
        observe.refused(
            self.ctx.tracking,
            self.ctx.activity,
            reply,
            device=device.name if device else None,
            peer=self.peer_ip,
            listener=self.listener.name,
            sender=(env.mail_from or "") if env is not None else "",
            recipient=self._rcpt_arg or every,
            tls=observe.tls_version(self.transport),
        )

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd answers what a command raised with this reply (then ``push`` closes if asked)."""
        if isinstance(error, CommandRefused):
            self._close_after_reply = self._close_after_reply or error.close
            return error.reply
        if isinstance(error, TLSSetupException):  # a failed STARTTLS handshake: one line, no traceback
            cause = error.__cause__ or error
            failures = self.ctx.tls_failures
            failures.failed(peer=self.peer_ip, listener=self.listener, how="STARTTLS", error=cause)
            return "454 4.7.0 TLS handshake failed"  # aiosmtpd closes the connection without a reply
        return await super().handle_exception(error)

    async def _close_with(self, reply: str) -> None:
        await self.push(reply)
        assert self.transport is not None
        self.transport.close()

    # -- shutdown (context.shutdown) ---------------------------------------------------------------
    def begin_shutdown(self) -> None:
        if self._lines is None or self._lines.waiting:
            self.goodbye()  # idle: waiting for the client's next line
        else:
            self._lines.closing = True  # busy: 421 once the reply in progress is out

    def goodbye(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._lines is not None:
            self._lines.say_goodbye()
        self._refused(SHUTTING_DOWN, command="-")
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(SHUTTING_DOWN.encode() + b"\r\n")
        transport.close()

    # -- greeting --------------------------------------------------------------------------------
    async def smtp_HELO(self, hostname: str) -> None:
        bad = policy.helo_reply(hostname or "")
        if bad:
            await self.push(bad)
            return
        await super().smtp_HELO(hostname)

    async def smtp_EHLO(self, hostname: str) -> None:
        bad = policy.helo_reply(hostname or "")
        if bad:
            await self.push(bad)
            return
        self.reset_transaction_state()
        self.sess().extended_smtp = True
        self.sess().host_name = hostname
        lines = [
            self.hostname,
            f"SIZE {policy.max_size(self.device(), self.listener)}",
            "8BITMIME",
            "SMTPUTF8",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
        ]
        if self.tls_context is not None and not self.tls_active:
            lines.append("STARTTLS")
        if self.offers_auth and not self.sess().authenticated:
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        for line in lines[:-1]:
            await self.push(f"250-{line}")
        await self.push(f"250 {lines[-1]}")

    # -- AUTH (RFC 4954; PLAIN RFC 4616; LOGIN as printers send it, any case) ---------------------
    async def smtp_AUTH(self, arg: str | None) -> None:
        if await self.check_helo_needed("EHLO"):
            return
        if not self.listener.auth:
            await self.push("503 5.5.1 Error: authentication not enabled")
            return
        if not self.offers_auth:
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if self.sess().authenticated:
            await self.push("503 5.5.1 Error: already authenticated")
            return
        parts = (arg or "").split()
        if not parts or len(parts) > 2:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mechanism, initial = parts[0].upper(), (parts[1] if len(parts) == 2 else None)
        if mechanism not in ("PLAIN", "LOGIN"):
            await self.push("504 5.5.4 Unrecognized authentication type")
            return
        outcome = await auth.authenticate(
            mechanism,
            initial,
            ask=self._auth_line,
            guard=self.ctx.guard,
            devices=self.ctx.devices,
            peer_ip=self.peer_ip,
            listener=self.listener.name,
        )
        if outcome.device is not None:
            self.login_device = outcome.device
            self.sess().authenticated = True
            log.info("authenticated peer=%s device=%s", self.peer_ip, outcome.device.name)
        self._note(outcome.detail)
        await self.push(outcome.reply)

    async def _auth_line(self, challenge: str) -> str | None:
        await self.push(f"334 {challenge}")
        try:
            line = await self.lines().read_line()  # checked like a command line
        except asyncio.LimitOverrunError:
            raise CommandRefused("500 5.5.6 AUTH response too long", close=True) from None
        if len(line) > auth.AUTH_LINE_LIMIT:
            raise ValueError("AUTH line too long")
        text = line.strip().decode("ascii", "replace")
        return None if text == "*" else text

    # -- envelope --------------------------------------------------------------------------------
    async def smtp_MAIL(self, arg: str | None) -> None:
        self._raw_arg = (arg or "")[5:] if (arg or "").upper().startswith("FROM:") else (arg or "")
        self._rcpt_arg = ""
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self._raw_arg = (arg or "")[3:] if (arg or "").upper().startswith("TO:") else (arg or "")
        self._rcpt_arg = self._raw_arg
        await super().smtp_RCPT(arg)

    def on_mail(self, envelope: SmtpEnvelope, address: str, options: list[str]) -> str:
        self._identify_again()
        device = self.device()
        if device is None:
            if self.listener.auth:
                return "530 5.7.0 Authentication required"
            return f"550 5.7.1 Client host [{self.peer_ip}] is not allowed to relay"
        # aiosmtpd parses "<>" as the address "<>"; it stays the envelope's (truthy) sender until
        # the commit, where the null sender is "" (RFC 5321 4.5.5: it must be accepted).
        sender = "" if address == NULL_SENDER else address
        reply = (
            policy.address_reply(
                self._raw_arg,
                sender,
                what="sender",
                fqdn=device.rewrite_sender is None,
                smtputf8=bool(envelope.smtp_utf8),
            )
            or policy.sender_reply(device, sender)
            or self.ctx.rates.reply(device)
        )
        if reply:
            return reply
        announced = 0
        for opt in options:
            name, _, value = opt.partition("=")
            if name == "SIZE" and value.isdigit() and int(value) > policy.max_size(device, self.listener):
                return "552 5.3.4 Message size exceeds fixed maximum message size"
            if name == "SIZE" and value.isdigit():
                announced = int(value)
        try:  # free space above the spool's reserve (RFC 1870 6.1: 452 for temporary lack of room)
            self.ctx.spool.check_room(announced)
        except SpoolError as e:
            return _spool_reply(e)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        self._seen(device)
        return "250 2.1.0 Ok"

    def on_rcpt(self, envelope: SmtpEnvelope, address: str, options: list[str]) -> str:
        device = self.device()
        assert device is not None  # MAIL succeeded, so there is a device
        limit = policy.max_recipients(device, self.listener)
        reply = policy.address_reply(
            self._raw_arg, address, what="recipient", smtputf8=bool(envelope.smtp_utf8)
        ) or policy.recipient_reply(device, address, len(envelope.rcpt_tos), limit)
        if not reply and envelope.mail_from == NULL_SENDER and device.rewrite_sender is None:
            # No DSN can ever report a failure of mail from <>: refuse now what no route can carry.
            reply = self.ctx.route_reply("", address, device.name)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    # -- DATA: streamed to the spool, 250 only after fsync ----------------------------------------
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if not self.env().rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        device = self.device()
        assert device is not None
        try:
            incoming = self.ctx.spool.incoming()
        except SpoolError as e:
            self._note(f"spool: {e}", logging.ERROR)
            await self.push(_spool_reply(e))
            return
        committing = False
        try:
            reply = await self._receive(incoming, device)
            if reply is None:
                committing = True
                reply = await self._commit(incoming, device)
            await self.push(reply)
        finally:
            if not committing:
                await incoming.abort()
            self.reset_after_data()

    async def _receive(self, incoming: IncomingMessage, device: DeviceSettings) -> str | None:
        """Read DATA to its end; return None when the message is ready to commit, else the reply."""
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit = policy.max_size(device, self.listener)
        parser = DataParser(bare_newlines=self.listener.bare_newlines)
        rcpts = self.env().rcpt_tos
        editor = HeaderEditor(
            incoming.write,
            new_from=device.rewrite_sender,
            max_size=self.listener.max_header_size,
            received=received_field(
                helo=self.sess().host_name or "unknown",
                ip=self.peer_ip,
                hostname=self.hostname,
                protocol=self._protocol(),
                queue_id=incoming.queue_id,
                rcpt=rcpts[0] if len(rcpts) == 1 else None,
            ),
        )
        size, failure = 0, None
        facts = self._facts = HeaderFacts()
        self._rcpt_arg = ""  # refusals from here on concern every recipient
        deadline = self.loop.time() + self.listener.data_timeout
        while True:
            chunk = await self.reader.read(CHUNK)
            if not chunk:
                raise ConnectionResetError("client closed the connection during DATA")
            self.reset_idle_timer()
            if self.loop.time() > deadline:
                await self._close_with("421 4.4.2 Timeout during DATA, closing connection")
                raise ConnectionResetError("DATA deadline exceeded")
            result = parser.feed(chunk)
            size += len(result.content) - result.dots  # the message's size, not its wire form's
            if failure is None and size > limit:
                failure = "552 5.3.4 Message size exceeds fixed maximum message size"
            if failure is None and result.content:
                if not facts.done:
                    facts.feed(result.content)
                try:
                    editor.write(result.content)
                    await incoming.drain()
                except MessageRefused as e:
                    failure = e.reply
                except SpoolError as e:
                    self._note(f"spool: {e}", logging.ERROR)
                    failure = _spool_reply(e)
            if result.leftover is not None:
                self.reader.unread(result.leftover)  # pipelined commands after the end of DATA
                break
        if parser.invalid:
            self._note(parser.invalid)
            return "550 5.6.11 Message refused: bare CR, bare LF or NUL in data (RFC 5321 2.3.8)"
        if failure is None:
            facts.finish()
            try:
                editor.finish()
            except MessageRefused as e:
                failure = e.reply
            except SpoolError as e:
                self._note(f"spool: {e}", logging.ERROR)
                failure = _spool_reply(e)
        return failure

    async def _commit(self, incoming: IncomingMessage, device: DeviceSettings) -> str:
        env = self.env()
        null = env.mail_from == NULL_SENDER
        mail_from = device.rewrite_sender or ("" if null else env.mail_from or "")
        envelope = Envelope(
            mail_from=mail_from,
            rcpt_tos=tuple(env.rcpt_tos),
            device=device.name,
            peer=self.peer_ip,
            listener=self.listener.name,
            smtputf8=bool(env.smtp_utf8),
            # A notification from <> never causes a bounce, even once its sender is rewritten
            # (RFC 5321 4.5.5, RFC 3461 6.2: no notification about a notification).
            is_dsn=null,
            subject=self._facts.subject,
            message_id=self._facts.message_id,
        )
        # Shielded: once the commit has started it finishes (row + file, or neither) even if the
        # client disconnects now; the entry is then complete, which is allowed (at-least-once).
        task = asyncio.ensure_future(incoming.commit(envelope))
        self.ctx.background.add(task)
        task.add_done_callback(self.ctx.background.discard)
        try:
            queue_id = await asyncio.shield(task)
        except SpoolError as e:
            self._note(f"spool: {e}", logging.ERROR)
            return _spool_reply(e)
        self.ctx.rates.accepted(device)
        self.ctx.metrics.count_accepted(self.listener.name, device.name)
        detail = f"size={incoming.size} {self._protocol()} {observe.tls_version(self.transport)}".strip()
        observe.received(self.ctx.tracking, self.ctx.activity, queue_id, envelope, detail=detail)
        self.ctx.on_queued(queue_id)
        log.info(
            "queued %s from=<%s> nrcpt=%d size=%d device=%s peer=%s listener=%s",
            queue_id,
            mail_from,
            len(envelope.rcpt_tos),
            incoming.size,
            device.name,
            self.peer_ip,
            self.listener.name,
        )
        return f"250 2.0.0 Ok: queued as {queue_id}"


def _spool_reply(error: SpoolError) -> str:
    if isinstance(error, SpoolFullError):
        return "452 4.3.1 Insufficient system storage"
    return "451 4.3.0 Local error in processing, try again later"
