"""The systemd notify protocol, sd_notify(3), over a unix datagram socket: no dependency needed.

systemd passes ``NOTIFY_SOCKET`` to a ``Type=notify`` service: a file system path, or ``@name`` for the
abstract namespace (sd_notify(3), "NOTIFY_SOCKET ... if the first character is '@', the socket is in the
abstract namespace"). Each message is one datagram of newline-separated ``VAR=VALUE`` assignments:

- ``READY=1``: start-up is finished; relay365 sends it once the spool is recovered and every listener
  accepts connections, so ``systemctl start`` returns only when devices can connect.
- ``STATUS=...``: one line that ``systemctl status`` shows.
- ``STOPPING=1``: shutdown has begun (sessions and deliveries in flight are being finished).
- ``RELOADING=1`` with ``MONOTONIC_USEC=``: a reload (SIGHUP) has begun; ``READY=1`` follows when it is
  over, applied or refused (sd_notify(3): "a service that sends this notification must also send a
  READY=1 notification when it completed reloading its configuration"; ``MONOTONIC_USEC`` is
  CLOCK_MONOTONIC in microseconds, which ``Type=notify-reload`` (systemd 253+) needs to tell this reload
  from an earlier one and older versions ignore).
- ``WATCHDOG=1``: the service is alive. With ``WatchdogSec=`` systemd passes ``WATCHDOG_USEC`` (and
  ``WATCHDOG_PID``, the process meant); without a ping within that time it kills and restarts the
  service. sd_watchdog_enabled(3) advises pinging every half interval; the pings come from a task on
  the event loop, so a blocked loop misses them, which is the point. ``WATCHDOG=trigger`` asks for the
  watchdog action at once (systemd 243+), sent when the delivery scheduler has died.

Without ``NOTIFY_SOCKET`` (a terminal, a container, a test) every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def socket_address(value: str) -> str:
    """The ``connect`` address of a ``NOTIFY_SOCKET`` value: ``@name`` is ``\\0name`` (abstract)."""
    return "\0" + value[1:] if value.startswith("@") else value


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings (half of ``WATCHDOG_USEC``), or None when the watchdog is not for us."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    wpid = environ.get("WATCHDOG_PID", "")
    if wpid and wpid != str(pid):  # meant for another process of the service (sd_watchdog_enabled(3))
        return None
    return int(usec) / 1_000_000 / 2


class Notifier:
    """Sends notifications to the service manager; a no-op without a socket."""

    def __init__(self, *, address: str | None = None, watchdog_interval: float | None = None) -> None:
        self._address = address
        self.watchdog_interval = watchdog_interval if address else None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        if not value:
            return cls()
        if not value.startswith(("/", "@")):
            log.warning("NOTIFY_SOCKET=%r is not a unix socket path or @name: not notifying systemd", value)
            return cls()
        return cls(address=socket_address(value), watchdog_interval=watchdog_interval(env, os.getpid()))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    async def send(self, *assignments: str) -> bool:
        """One datagram with these ``VAR=VALUE`` lines; False (logged once) if it could not be sent."""
        if self._address is None:
            return False
        data = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                try:
                    sock.connect(self._address)
                except OSError:
                    sock.close()
                    raise
                self._sock = sock
            await asyncio.get_running_loop().sock_sendall(self._sock, data)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd on %r: %s", self._address.replace("\0", "@"), e)
            return False
        return True

    async def ready(self, status: str) -> bool:
        return await self.send("READY=1", f"STATUS={status}")

    async def status(self, status: str) -> bool:
        return await self.send(f"STATUS={status}")

    async def reloading(self, status: str) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return await self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")

    async def stopping(self, status: str) -> bool:
        return await self.send("STOPPING=1", f"STATUS={status}")

    async def watchdog(self, *, healthy: Callable[[], bool]) -> None:
        """Ping every half interval while ``healthy()``; otherwise ask for the watchdog action now.
        Runs until cancelled (returns at once when the watchdog is off)."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            if not healthy():
                log.error("relay365 is not healthy (delivery stopped): asking systemd to restart it")
                await self.send("WATCHDOG=trigger", "STATUS=Unhealthy: delivery stopped; restarting")
                return
            await self.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
