"""The device-facing SMTP server: aiosmtpd 1.4.6 with the holes a production relay must close.

aiosmtpd gives the command loop, STARTTLS (with the RFC 3207 buffer discard) and the command syntax.
This subclass adds what it lacks: connection caps (421 4.7.0), device identity (IP, AUTH, client
certificate), case-insensitive AUTH PLAIN/LOGIN with brute-force back-off, per-device policy, a
recipient limit, and a streaming DATA that writes to the spool as it arrives, refuses bare CR/LF/NUL,
and answers 250 only after the spool's fsync. Delivery never happens here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import inspect
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, AnyStr

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP, Session, TLSSetupException
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from relay365.admin.metrics import Metrics
from relay365.errors import SpoolError, SpoolFullError
from relay365.ingress import observe, policy
from relay365.ingress.data import DataParser
from relay365.ingress.facts import HeaderFacts
from relay365.ingress.handshake import HandshakeLog, implicit_tls
from relay365.ingress.headers import HeaderEditor, HeaderTooLarge, received_field
from relay365.ingress.identity import AuthGuard, ConnectionLimiter, DeviceDirectory, peer_certificate
from relay365.observability.activity import DeviceActivity
from relay365.observability.tracking import MemoryTrackingLog, TrackingLog
from relay365.settings import DeviceSettings, ListenerSettings
from relay365.spool.model import Envelope, IncomingMessage, Spool

log = logging.getLogger(__name__)
CHUNK = 1 << 16
AUTH_LINE_LIMIT = 12288  # RFC 4954 4: an AUTH line may be up to 12288 octets
# <local@domain> with dot-atoms only (RFC 5321 4.1.2): the form nearly every client sends. aiosmtpd's
# email-header parser gives the same address for it; anything else still goes through that parser.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(rf"[ \t]*<({_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*)>")


@dataclass
class IngressContext:
    """What every session of every listener shares. Built once by the composition root."""

    spool: Spool
    devices: DeviceDirectory
    limiter: ConnectionLimiter
    guard: AuthGuard
    rates: policy.RateLimiter
    hostname: str
    on_queued: Callable[[str], None] = lambda queue_id: None
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    metrics: Metrics = field(default_factory=Metrics)
    tls_failures: HandshakeLog = field(default_factory=HandshakeLog)
    tracking: TrackingLog = field(default_factory=MemoryTrackingLog)
    activity: DeviceActivity = field(default_factory=DeviceActivity)


class _Hooks:
    """aiosmtpd calls these after its own syntax checks; the verdicts come from ``policy``."""

    async def handle_MAIL(
        self, server: RelaySMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        return server.on_mail(envelope, address, options)

    async def handle_RCPT(
        self, server: RelaySMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        return server.on_rcpt(envelope, address, options)


class _AuthMemberCache:
    """aiosmtpd 1.4.6 runs ``inspect.getmembers`` on the session and on the handler at every
    connection to find ``auth_*`` methods: 12% of the CPU of a one-message session. For relay365's
    own classes the same members are found from names cached per class; everything else is
    ``inspect`` itself."""

    def __init__(self) -> None:
        self._names: dict[type, tuple[str, ...]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)

    def getmembers(
        self, obj: object, predicate: Callable[[Any], bool] | None = None
    ) -> list[tuple[str, Any]]:
        if predicate is not None or not isinstance(obj, RelaySMTP | _Hooks):
            return inspect.getmembers(obj, predicate)
        cls = type(obj)
        names = self._names.get(cls)
        if names is None:
            names = self._names[cls] = tuple(
                n for n in dir(cls) if n.startswith("auth_") and inspect.isfunction(getattr(cls, n))
            )
        return [(n, getattr(obj, n)) for n in names]


aiosmtpd.smtp.inspect = _AuthMemberCache()  # type: ignore[attr-defined,assignment]


class RelaySMTP(SMTP):
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
        self._raw_arg = ""
        self._facts = HeaderFacts()
        self._rcpt_arg = ""  # the RCPT argument being answered (refusals name the recipient)

    # -- connection ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._admitted and self._original_transport is None:
            peer = transport.get_extra_info("peername") or ("", 0)
            self.peer_ip = str(peer[0])
            reason = None
            if self.ctx.guard.blocked(self.peer_ip):
                reason = "421 4.7.0 Too many authentication failures from your address"
            else:
                reason = self.ctx.limiter.admit(self.peer_ip)
            if reason is not None:
                self._rejected = True
                log.warning(
                    "refused connection peer=%s listener=%s: %s", self.peer_ip, self.listener.name, reason
                )
                assert isinstance(transport, asyncio.WriteTransport)
                self.ctx.metrics.refusal(reason)
                self._track_refusal(reason)
                transport.write(reason.encode() + b"\r\n")
                transport.close()
                return
            self._admitted = True
            self.ip_device = self.ctx.devices.by_ip(self.peer_ip, self.listener.name)
            self._seen(self.ip_device)
        super().connection_made(transport)
        if self._implicit_tls or self._tls_protocol is not None:
            self._identify_certificate(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._rejected:
            return
        if self._admitted:
            self._admitted = False
            self.ctx.limiter.release(self.peer_ip)
        super().connection_lost(error)

    def _identify_certificate(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return
        self.sess().ssl = {"cipher": ssl_object.cipher(), "version": ssl_object.version()}
        cert = peer_certificate(ssl_object.getpeercert(binary_form=True), ssl_object.getpeercert())
        if cert is not None:
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

    @property
    def tls_active(self) -> bool:
        return self._implicit_tls or self._tls_protocol is not None

    @property
    def offers_auth(self) -> bool:
        return self.listener.auth and (self.tls_active or self.listener.allow_plaintext_auth)

    def device(self) -> DeviceSettings | None:
        return self.login_device or self.cert_device or self.ip_device

    def _protocol(self) -> str:
        return "ESMTP" + ("S" if self.tls_active else "") + ("A" if self.login_device else "")

    async def push(self, status: AnyStr) -> None:
        text = status.decode("ascii", "replace") if isinstance(status, bytes) else status
        if text[:1] in ("4", "5"):
            self.ctx.metrics.refusal(text)
            self._track_refusal(text)
        await super().push(status)

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
        self._set_rset_state()  # type: ignore[no-untyped-call]
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
        try:
            credentials = await self._read_credentials(mechanism, initial)
        except ValueError:
            await self.push("501 5.5.2 Cannot decode response")
            return
        if credentials is None:
            await self.push("501 5.7.0 Authentication aborted")
            return
        username, password = credentials
        device = await self.ctx.devices.by_password(username, password, self.listener.name)
        if device is not None:
            self.ctx.guard.success(self.peer_ip)
            self.login_device = device
            self.sess().authenticated = True
            log.info("authenticated peer=%s device=%s", self.peer_ip, device.name)
            await self.push("235 2.7.0 Authentication successful")
            return
        delay = self.ctx.guard.failure_delay(self.peer_ip)
        log.warning("authentication failed peer=%s user=%r", self.peer_ip, username[:64])
        await asyncio.sleep(delay)
        if self.ctx.guard.blocked(self.peer_ip):
            await self._close_with("421 4.7.0 Too many authentication failures, closing connection")
            return
        await self.push("535 5.7.8 Authentication credentials invalid")

    async def _read_credentials(self, mechanism: str, initial: str | None) -> tuple[str, str] | None:
        if mechanism == "PLAIN":
            blob = initial if initial is not None else await self._auth_line("")
            if blob is None:
                return None
            fields = _b64(blob).split(b"\x00")
            if len(fields) != 3:
                raise ValueError("PLAIN needs authzid NUL authcid NUL passwd")
            return fields[1].decode("utf-8"), fields[2].decode("utf-8")
        user_blob = initial if initial is not None else await self._auth_line("VXNlcm5hbWU6")
        if user_blob is None:
            return None
        pass_blob = await self._auth_line("UGFzc3dvcmQ6")
        if pass_blob is None:
            return None
        return _b64(user_blob).decode("utf-8"), _b64(pass_blob).decode("utf-8")

    async def _auth_line(self, challenge: str) -> str | None:
        await self.push(f"334 {challenge}")
        line = await self._reader.readline()
        if len(line) > AUTH_LINE_LIMIT:
            raise ValueError("AUTH line too long")
        text = line.strip().decode("ascii", "replace")
        return None if text == "*" else text

    # -- envelope --------------------------------------------------------------------------------
    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        m = _SIMPLE_PATH.match(arg)
        rest = arg[m.end() :].lstrip(" \t") if m else "("
        if m is None or rest.startswith("(") or m.group(1).index("@") > (self.local_part_limit or 1 << 30):
            return super()._getaddr(arg)
        return m.group(1), rest

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._raw_arg = (arg or "")[5:] if (arg or "").upper().startswith("FROM:") else (arg or "")
        self._rcpt_arg = ""
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self._raw_arg = (arg or "")[3:] if (arg or "").upper().startswith("TO:") else (arg or "")
        self._rcpt_arg = self._raw_arg
        await super().smtp_RCPT(arg)

    def on_mail(self, envelope: SmtpEnvelope, address: str, options: list[str]) -> str:
        device = self.device()
        if device is None:
            if self.listener.auth:
                return "530 5.7.0 Authentication required"
            return f"550 5.7.1 Client host [{self.peer_ip}] is not allowed to relay"
        reply = (
            policy.address_reply(self._raw_arg, address, what="sender", fqdn=device.rewrite_sender is None)
            or policy.sender_reply(device, address)
            or self.ctx.rates.reply(device)
        )
        if reply:
            return reply
        for opt in options:
            name, _, value = opt.partition("=")
            if name == "SIZE" and value.isdigit() and int(value) > policy.max_size(device, self.listener):
                return "552 5.3.4 Message size exceeds fixed maximum message size"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        self._seen(device)
        return "250 2.1.0 Ok"

    def on_rcpt(self, envelope: SmtpEnvelope, address: str, options: list[str]) -> str:
        device = self.device()
        assert device is not None  # MAIL succeeded, so there is a device
        limit = policy.max_recipients(device, self.listener)
        reply = policy.address_reply(self._raw_arg, address, what="recipient") or policy.recipient_reply(
            device, address, len(envelope.rcpt_tos), limit
        )
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
            self._set_post_data_state()  # type: ignore[no-untyped-call]

    async def _receive(self, incoming: IncomingMessage, device: DeviceSettings) -> str | None:
        """Read DATA to its end; return None when the message is ready to commit, else the reply."""
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit = policy.max_size(device, self.listener)
        parser = DataParser(bare_newlines=self.listener.bare_newlines)
        rcpts = self.env().rcpt_tos
        editor = HeaderEditor(
            incoming.write,
            new_from=device.rewrite_sender,
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
            chunk = await self._reader.read(CHUNK)
            if not chunk:
                raise ConnectionResetError("client closed the connection during DATA")
            self._reset_timeout()
            if self.loop.time() > deadline:
                await self._close_with("421 4.4.2 Timeout during DATA, closing connection")
                raise ConnectionResetError("DATA deadline exceeded")
            result = parser.feed(chunk)
            size += len(result.content)
            if failure is None and size > limit:
                failure = "552 5.3.4 Message size exceeds fixed maximum message size"
            if failure is None and result.content:
                if not facts.done:
                    facts.feed(result.content)
                try:
                    editor.write(result.content)
                    await incoming.drain()
                except HeaderTooLarge:
                    failure = "552 5.3.4 Message header section too large to rewrite the sender"
                except SpoolError as e:
                    failure = _spool_reply(e)
            if result.leftover is not None:
                self._reader._buffer[0:0] = result.leftover  # type: ignore[attr-defined]
                break
        if parser.invalid:
            log.warning("refused message peer=%s device=%s: %s", self.peer_ip, device.name, parser.invalid)
            return "550 5.6.11 Message refused: bare CR, bare LF or NUL in data (RFC 5321 2.3.8)"
        if failure is None:
            facts.finish()
            try:
                editor.finish()
            except SpoolError as e:
                failure = _spool_reply(e)
        return failure

    async def _commit(self, incoming: IncomingMessage, device: DeviceSettings) -> str:
        env = self.env()
        mail_from = device.rewrite_sender or env.mail_from or ""
        envelope = Envelope(
            mail_from=mail_from,
            rcpt_tos=tuple(env.rcpt_tos),
            device=device.name,
            peer=self.peer_ip,
            listener=self.listener.name,
            smtputf8=bool(env.smtp_utf8),
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
            log.error("spool refused message peer=%s device=%s: %s", self.peer_ip, device.name, e)
            return _spool_reply(e)
        self.ctx.rates.accepted(device)
        self.ctx.metrics.accepted.labels(self.listener.name, device.name).inc()
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


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("bad base64") from None


def _spool_reply(error: SpoolError) -> str:
    if isinstance(error, SpoolFullError):
        return "452 4.3.1 Insufficient system storage"
    return "451 4.3.0 Local error in processing, try again later"


async def start_listener(
    ctx: IngressContext, listener: ListenerSettings, tls_context: ssl.SSLContext | None
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    factory: Callable[[], asyncio.Protocol] = lambda: RelaySMTP(ctx, listener, tls_context)  # noqa: E731
    if listener.tls == "implicit":  # the handshake runs in the relay's code (ingress/handshake.py)
        assert tls_context is not None
        factory = implicit_tls(factory, context=tls_context, listener=listener, failures=ctx.tls_failures)
    return await loop.create_server(
        factory, host=listener.address, port=listener.port, reuse_address=True, backlog=1024
    )
