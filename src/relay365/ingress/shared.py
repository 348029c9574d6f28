"""An ingress worker's view of the relay's global state, held by the supervisor (service/workers.py).

With ``[server] workers`` above 1, several processes accept device connections on the same listening
sockets. What must stay global is kept once, in the supervisor: the connection caps (total and per IP),
the AUTH failure counters (per address and per user name, checked before any password, issue 8) and the
per-device message rates. A worker reaches them through ``SharedState``: one request, one reply over a
``SOCK_SEQPACKET`` socket pair (a message per datagram: no framing), answered by the supervisor's event
loop. The calls are blocking and short (a local round trip, ~50 us); they are the same synchronous
calls a single process makes on its own objects, so the session code does not change.

What only needs telling (a connection released, a message accepted, a refusal counted, a device seen, a
message queued for delivery) is sent without waiting for a reply; the socket keeps the order. So the
supervisor's metrics (``/metrics``) and device activity (the console) are those of every process.

If the supervisor is gone the worker is stopping (``service/worker.py`` watches for that): a new
connection is refused with 421 and AUTH is refused as blocked, never let through unchecked.
"""

from __future__ import annotations

import json
import logging
import pickle
import socket
import struct
from typing import Any

from relay365.errors import SpoolCommitUnknown, SpoolIOError
from relay365.ingress.identity import AuthGuard, ConnectionLimiter
from relay365.ingress.policy import RateLimiter
from relay365.observability.activity import DeviceActivity
from relay365.observability.metrics import Metrics
from relay365.settings import DeviceSettings, ServerSettings
from relay365.spool.model import Envelope

log = logging.getLogger(__name__)

MAX_MESSAGE = 65536  # one request or reply (a reply is a short string or a number)
UNAVAILABLE = "421 4.3.2 Service shutting down, try again later"


class SupervisorGone(ConnectionError):
    """The supervisor's end of the socket is closed (it stopped or died)."""


class SharedState:
    """The worker's end of the socket pair to the supervisor (blocking, used from one thread)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self._sock = sock
        self.gone = False

    def call(self, *request: Any) -> Any:
        """Send ``request``, return the supervisor's reply; ``SupervisorGone`` when it cannot answer."""
        if self.gone:
            raise SupervisorGone("the supervisor is gone")
        try:
            self._sock.send(json.dumps(request).encode())
            reply = self._sock.recv(MAX_MESSAGE)
        except OSError as e:
            self.gone = True
            raise SupervisorGone(str(e)) from e
        if not reply:
            self.gone = True
            raise SupervisorGone("the supervisor closed the connection")
        return json.loads(reply)

    def tell(self, *message: Any) -> None:
        """Send ``message``; no reply comes. Lost (with a debug line) once the supervisor is gone."""
        if self.gone:
            return
        try:
            self._sock.send(json.dumps(message).encode())
        except OSError as e:
            self.gone = True
            log.debug("the supervisor is gone: %s", e)

    def close(self) -> None:
        self._sock.close()


class SharedLimiter(ConnectionLimiter):
    """``ConnectionLimiter`` whose counts are the supervisor's (every worker's connections)."""

    def __init__(self, state: SharedState) -> None:
        super().__init__(total=0, per_ip=0)
        self._state = state
        self._mine = 0  # this worker's open connections

    def configure(self, *, total: int, per_ip: int) -> None:
        """Limits are the supervisor's (it reloads them)."""

    def admit(self, ip: str) -> str | None:
        try:
            reason: str | None = self._state.call("admit", ip)
        except SupervisorGone:
            return UNAVAILABLE
        if reason is None:
            self._mine += 1
        return reason

    def release(self, ip: str) -> None:
        self._mine -= 1
        self._state.tell("release", ip)

    @property
    def active(self) -> int:
        return self._mine


class SharedGuard(AuthGuard):
    """``AuthGuard`` whose failure counts are the supervisor's: a block holds on every worker."""

    def __init__(self, state: SharedState, settings: ServerSettings) -> None:
        super().__init__(settings)
        self._state = state

    def configure(self, settings: ServerSettings) -> None:
        """Limits are the supervisor's (it reloads them)."""

    def blocked(self, ip: str, username: str | None = None) -> bool:
        try:
            return bool(self._state.call("blocked", ip, username))
        except SupervisorGone:
            return True

    def begin(self, ip: str, username: str) -> bool:
        try:
            return bool(self._state.call("begin", ip, username))
        except SupervisorGone:
            return False

    def success(self, ip: str, username: str) -> None:
        self._state.tell("success", ip, username)

    def failure(self, ip: str, username: str) -> float:
        try:
            return float(self._state.call("failure", ip, username))
        except SupervisorGone:
            return 0.0


class SharedRates(RateLimiter):
    """``RateLimiter`` whose windows are the supervisor's (a device's rate over every worker)."""

    def __init__(self, state: SharedState) -> None:
        super().__init__()
        self._state = state

    def reply(self, device: DeviceSettings) -> str | None:
        if device.max_messages_per_minute is None:
            return None
        try:
            answer: str | None = self._state.call("rate", device.name, device.max_messages_per_minute)
        except SupervisorGone:
            return UNAVAILABLE
        return answer

    def accepted(self, device: DeviceSettings) -> None:
        if device.max_messages_per_minute is not None:
            self._state.tell("accepted", device.name, device.max_messages_per_minute)


class SharedMetrics(Metrics):
    """What ingress counts, counted in the supervisor's registry: ``/metrics`` shows one set."""

    def __init__(self, state: SharedState) -> None:
        super().__init__()
        self._state = state

    def refusal(self, reply: str) -> None:
        self._state.tell("refusal", reply)

    def count_accepted(self, listener: str, device: str) -> None:
        self._state.tell("counted", listener, device)


class SharedActivity(DeviceActivity):
    """What the console shows of each device (last seen, last accepted, last refusal), recorded in the
    supervisor's ``DeviceActivity``."""

    def __init__(self, state: SharedState, *, configured: tuple[str, ...] = ()) -> None:
        super().__init__(configured=configured)
        self._state = state

    def seen(self, device: str | None, *, address: str, listener: str, tls_version: str) -> None:
        self._state.tell("seen", device, address, listener, tls_version)

    def accepted(self, device: str, *, address: str) -> None:
        self._state.tell("device_accepted", device, address)

    def refused(self, device: str | None, *, address: str, reply: str) -> None:
        self._state.tell("device_refused", device, address, reply)


_LENGTH = struct.Struct("!Q")


class RemoteCommits:
    """A worker's SQLite spool commits through the supervisor (``SqliteSpool.delegate_commits``): the
    rows of one group commit, pickled, length-prefixed, over a stream socket pair used only by the
    spool's database thread; the reply is empty once they are committed, else the error's text."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self._sock = sock

    def __call__(self, rows: list[tuple[str, Envelope, int]], now: float, body_dir: str) -> None:
        data = pickle.dumps((rows, now, body_dir))
        try:
            self._sock.sendall(_LENGTH.pack(len(data)) + data)
        except OSError as e:  # not the whole frame: the supervisor commits nothing of it
            raise SpoolIOError(f"the supervisor cannot commit the message: {e}") from e
        try:
            reply = self._read(self._read(_LENGTH.size, length=True))
        except OSError as e:  # it had the rows: committed or not, nobody here knows
            raise SpoolCommitUnknown(f"the supervisor went away while committing the message: {e}") from e
        if reply:
            raise SpoolIOError(reply.decode(errors="replace"))

    def _read(self, n: int, *, length: bool = False) -> Any:
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionResetError("the supervisor is gone")
            buf += chunk
        return _LENGTH.unpack(buf)[0] if length else bytes(buf)

    def close(self) -> None:
        self._sock.close()


def frame(data: bytes) -> bytes:
    """``data`` with its length in front (the commits socket's framing)."""
    return _LENGTH.pack(len(data)) + data


LENGTH_SIZE = _LENGTH.size


def length_of(header: bytes) -> int:
    return int(_LENGTH.unpack(header)[0])
