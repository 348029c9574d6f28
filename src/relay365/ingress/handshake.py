"""Failed TLS handshakes on device listeners: one log line each, rate-limited, never a traceback.

A line names the peer, the listener and how TLS started there (implicit TLS or STARTTLS), what the
client offered (read from its ClientHello by ``ListenerTLSContext``) and the reason, with the fix when
the reason implies one::

    TLS handshake failed peer=10.1.2.3 listener=smtps (implicit TLS) offered=TLSv1.0
    reason=UNSUPPORTED_PROTOCOL: the client offers only TLS versions below this listener's minimum ...

At most ``PER_PEER_PER_WINDOW`` lines per peer and ``TOTAL_PER_WINDOW`` lines in all per ``WINDOW``
seconds; what is left out is counted and summed up in one line when the window ends, so a port scan
costs a handful of lines a minute, not thousands.

Where the failures come from:

* STARTTLS: aiosmtpd raises ``TLSSetupException`` from the failed handshake; the session's
  ``handle_exception`` hands it here instead of aiosmtpd's default (a traceback at ERROR).
* Implicit TLS (port 465, RFC 8314 3.3): asyncio's own server-side handshake (``create_server(ssl=)``)
  reports a failure nowhere outside debug mode (an ``ssl.SSLError`` is an ``OSError``, which
  ``SSLProtocol._fatal_error`` only logs at DEBUG) and never tells the protocol. So an implicit TLS
  listener accepts plain TCP and runs the handshake itself with the public ``loop.start_tls``
  (:class:`ImplicitTLSAcceptor`); the SMTP session starts only once the handshake is done, exactly
  as before. No loop exception handler and no patching of asyncio are needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from relay365.ingress.tls import offered
from relay365.settings import ListenerSettings

log = logging.getLogger(__name__)

WINDOW = 60.0
PER_PEER_PER_WINDOW = 5
TOTAL_PER_WINDOW = 100
MAX_PEERS = 4096  # peers remembered at once; older windows are dropped first
HANDSHAKE_TIMEOUT = 30.0  # seconds a client has to finish the implicit TLS handshake
_SUMMARY_PEERS = 5

_OLD_VERSION = "the client offers only TLS versions below this listener's minimum, TLS {min}"
_NO_CIPHER = "no cipher suite in common"
# What to do about it depends on whether the listener is already the legacy one.
_FIX = {
    (_OLD_VERSION, False): "; a device that cannot do TLS {min} belongs on a listener with legacy = true and"
    ' min_tls_version = "1.0"',
    (_NO_CIPHER, False): "; a device of the TLS 1.0 era that offers only RSA key exchange belongs on a"
    " listener with legacy = true (it serves an RSA certificate)",
    (_NO_CIPHER, True): "; a device that offers only RSA key exchange needs an RSA certificate here (the"
    " default self-signed pair has one; a cert_file must then be RSA)",
}
_NOT_TLS = "not TLS: a plain-text client on a TLS port, or a scanner"
_DISTRUST = (
    "the client does not trust the relay's certificate; give the listener a certificate the device"
    " trusts (cert_file/key_file) or import it on the device"
)
_HINTS: dict[str, str] = {
    "UNSUPPORTED_PROTOCOL": _OLD_VERSION,
    "VERSION_TOO_LOW": _OLD_VERSION,
    "NO_PROTOCOLS_AVAILABLE": _OLD_VERSION,
    "NO_SHARED_CIPHER": _NO_CIPHER,
    "NO_SHARED_SIGNATURE_ALGORITHMS": _NO_CIPHER,
    "NO_SUITABLE_SIGNATURE_ALGORITHM": _NO_CIPHER,
    "WRONG_VERSION_NUMBER": _NOT_TLS,
    "HTTP_REQUEST": _NOT_TLS,
    "HTTPS_PROXY_REQUEST": _NOT_TLS,
    "UNKNOWN_PROTOCOL": _NOT_TLS,
    "PACKET_LENGTH_TOO_LONG": _NOT_TLS,
    "RECORD_LAYER_FAILURE": _NOT_TLS,
    "TLSV1_ALERT_UNKNOWN_CA": _DISTRUST,
    "SSLV3_ALERT_BAD_CERTIFICATE": _DISTRUST,
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": _DISTRUST,
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": _DISTRUST,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": _DISTRUST,
    "UNEXPECTED_EOF_WHILE_READING": "the client closed the connection during the handshake",
}


def reason(error: BaseException, listener: ListenerSettings) -> str:
    """The OpenSSL reason code (greppable) and what it means for the admin, on one line."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            f"CERTIFICATE_VERIFY_FAILED: the client's certificate is not trusted by client_ca_file"
            f" ({error.verify_message})"
        )
    if isinstance(error, ssl.SSLError):
        code = error.reason or type(error).__name__
        hint = _HINTS.get(code, "")
        if code.endswith("ALERT_PROTOCOL_VERSION"):
            hint = _OLD_VERSION
        hint = (hint + _FIX.get((hint, listener.legacy), "")).format(min=listener.min_tls_version)
        return f"{code}: {hint}" if hint else f"{code} ({error.library or 'SSL'})"
    if isinstance(error, ConnectionAbortedError):
        return f"the handshake timed out ({error})"
    if isinstance(error, ConnectionError):
        return "the client closed the connection before sending a TLS ClientHello or during the handshake"
    return f"{type(error).__name__}: {error}"


@dataclass
class _Window:
    start: float
    logged: int = 0


class HandshakeThrottle:
    """Which failures get a line: fixed windows per peer and for all peers together (pure, no clock of
    its own). ``take_suppressed`` returns and resets the per-peer counts of what was left out."""

    def __init__(
        self,
        *,
        per_peer: int = PER_PEER_PER_WINDOW,
        total: int = TOTAL_PER_WINDOW,
        window: float = WINDOW,
        max_peers: int = MAX_PEERS,
    ) -> None:
        self._per_peer, self._total, self._window, self._max_peers = per_peer, total, window, max_peers
        self.tracked: dict[str, _Window] = {}
        self._all = _Window(start=float("-inf"))
        self._suppressed: dict[str, int] = {}

    def _fresh(self, w: _Window, now: float) -> _Window:
        return w if w.start <= now < w.start + self._window else _Window(start=now)

    def admit(self, peer: str, now: float) -> bool:
        self._all = self._fresh(self._all, now)
        w = self.tracked.pop(peer, None)
        w = self._fresh(w, now) if w is not None else _Window(start=now)
        self.tracked[peer] = w  # re-inserted: the dict stays ordered oldest window first
        while len(self.tracked) > self._max_peers:
            del self.tracked[next(iter(self.tracked))]
        if w.logged >= self._per_peer or self._all.logged >= self._total:
            self._suppressed[peer] = self._suppressed.get(peer, 0) + 1
            return False
        w.logged += 1
        self._all.logged += 1
        return True

    def take_suppressed(self) -> dict[str, int]:
        out, self._suppressed = self._suppressed, {}
        return out


class HandshakeLog:
    """Logs failed handshakes of every listener through one throttle. ``seen`` counts all failures."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, throttle: HandshakeThrottle | None = None
    ) -> None:
        self._clock = clock
        self._throttle = throttle or HandshakeThrottle()
        self._timer: asyncio.TimerHandle | None = None
        self.seen = 0

    def failed(self, *, peer: str, listener: ListenerSettings, how: str, error: BaseException) -> None:
        self.seen += 1
        if not self._throttle.admit(peer, self._clock()):
            self._flush_later()
            return
        what = offered(error)
        level = logging.WARNING if isinstance(error, ssl.SSLError) else logging.INFO
        log.log(
            level,
            "TLS handshake failed peer=%s listener=%s (%s) offered=%s reason=%s",
            peer,
            listener.name,
            how,
            what or "-",
            reason(error, listener),
        )

    def _flush_later(self) -> None:
        if self._timer is None:
            # Without a running loop (a direct call) the next flush() reports it.
            with contextlib.suppress(RuntimeError):
                self._timer = asyncio.get_running_loop().call_later(WINDOW, self.flush)

    def flush(self) -> None:
        """One line for everything left out since the last flush (the window timer calls this)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        counts = self._throttle.take_suppressed()
        if not counts:
            return
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        peers = ", ".join(f"{p} ({n})" for p, n in top[:_SUMMARY_PEERS])
        more = f" and {len(top) - _SUMMARY_PEERS} more peer(s)" if len(top) > _SUMMARY_PEERS else ""
        log.warning(
            "TLS handshake failed: %d more failed TLS handshake(s) not logged (at most %d lines per peer"
            " per %g s) from %s%s",
            sum(counts.values()),
            PER_PEER_PER_WINDOW,
            WINDOW,
            peers,
            more,
        )

    def close(self) -> None:
        self.flush()


class ImplicitTLSAcceptor(asyncio.Protocol):
    """An implicit TLS connection until its handshake is done; then ``session()`` takes it over.

    Reading is paused at once, so the first byte the client sends goes to the TLS layer that
    ``loop.start_tls`` puts in place. Application data that arrives between the end of the handshake
    and the hand-over is passed on to the session; a connection that ends in that gap never gets one.
    """

    def __init__(
        self,
        *,
        session: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext,
        listener: ListenerSettings,
        failures: HandshakeLog,
        timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self._session, self._context, self._listener = session, context, listener
        self._failures, self._timeout = failures, timeout
        self._peer = ""
        self._early: list[bytes] = []
        self._ended = False
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self._peer = str((transport.get_extra_info("peername") or ("",))[0])
        self._task = asyncio.get_running_loop().create_task(self._handshake(transport))

    async def _handshake(self, raw: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                raw, self, self._context, server_side=True, ssl_handshake_timeout=self._timeout
            )
        except OSError as error:  # ssl.SSLError, a reset, the handshake timeout
            self._failures.failed(peer=self._peer, listener=self._listener, how="implicit TLS", error=error)
            return
        if tls is None or self._ended:
            if tls is not None:
                tls.abort()
            return
        session = self._session()
        tls.set_protocol(session)
        session.connection_made(tls)
        for data in self._early:
            session.data_received(data)
        self._early.clear()

    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def eof_received(self) -> bool | None:
        self._ended = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = True
