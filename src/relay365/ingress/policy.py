"""Per-device policy: pure verdicts, decided before anything is queued.

Each check returns ``None`` (accept) or the exact SMTP reply to send. The address that is judged is
exactly the address that is queued and later sent upstream: addresses with relay tricks (``%``, ``!``,
source routes, quoted local parts containing ``@``, IP-literal domains, CR/LF) are refused outright
instead of being interpreted (reliability.md, "Open relay").
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable

from relay365.settings import DeviceSettings, ListenerSettings

# RFC 5321 4.1.2 dot-atom local part, minus the relay-routing characters '%' and '!'.
_LOCAL = r"[A-Za-z0-9#$&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9#$&'*+/=?^_`{|}~-]+)*"
# RFC 5321 4.1.2 domain: letters-digits-hyphen labels (UTF-8 allowed for SMTPUTF8); a single label
# ("root@printer") is valid syntax but not fully qualified, see address_reply.
_LABEL = (
    r"(?:[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\u0080-\U0010ffff-]{0,61}[A-Za-z0-9\u0080-\U0010ffff])?)"
)
_ADDRESS = re.compile(rf"^(?:{_LOCAL}|[\u0080-\U0010ffff\w.+-]+)@{_LABEL}(?:\.{_LABEL})*$")
_HELO = re.compile(r"^[A-Za-z0-9._:\-\[\]]{1,255}$")
# RFC 5321 4.5.3.1.1 / 4.5.3.1.2 length limits
MAX_LOCAL_PART = 64
MAX_ADDRESS = 254


def helo_reply(hostname: str) -> str | None:
    if not _HELO.match(hostname):
        return "501 5.5.4 Invalid HELO/EHLO hostname"
    return None


def address_reply(raw_arg: str, address: str, *, what: str, fqdn: bool = True) -> str | None:
    """Refuse relay tricks and malformed addresses. ``raw_arg`` is the text after ``FROM:``/``TO:``.
    ``fqdn``: the address goes upstream, so its domain must be fully qualified (Postfix's
    reject_non_fqdn_sender/recipient); a device whose sender is rewritten may use ``root@printer``."""
    if any(c in raw_arg for c in "\r\n\x00"):
        return "501 5.5.2 Control characters in address"
    if raw_arg.lstrip().startswith("<@"):
        return "553 5.1.3 Source routes are not accepted"
    if what == "sender" and address == "":
        return None
    local, _, _domain = address.rpartition("@")
    if not local or len(local) > MAX_LOCAL_PART or len(address) > MAX_ADDRESS:
        return f"553 5.1.3 Bad {what} address syntax"
    if not _ADDRESS.match(address) or "%" in local or "!" in local or '"' in local:
        return f"553 5.1.3 Bad {what} address syntax (relay forms are not accepted)"
    if fqdn and "." not in address.rpartition("@")[2]:
        return f"504 5.5.2 <{address}>: {what.capitalize()} address rejected: need fully-qualified address"
    return None


def _matches(pattern: str, address: str) -> bool:
    a = address.lower()
    if pattern == "*":
        return True
    if pattern.startswith("@"):
        return a.endswith(pattern)
    return a == pattern


def sender_reply(device: DeviceSettings, address: str) -> str | None:
    if any(_matches(p, address) for p in device.allowed_senders):
        return None
    return f"550 5.7.1 Device {device.name} may not send as <{address}>"


def recipient_reply(device: DeviceSettings, address: str, count: int, limit: int) -> str | None:
    """``count`` is the number of recipients already accepted in this transaction."""
    if count >= limit:
        return "452 4.5.3 Too many recipients"  # RFC 5321 4.5.3.1.10: 452 and the client retries
    domains = device.allowed_recipient_domains
    if domains and address.rpartition("@")[2].lower() not in domains:
        return f"550 5.7.1 Device {device.name} may not send to <{address}>"
    return None


def max_size(device: DeviceSettings | None, listener: ListenerSettings) -> int:
    if device is not None and device.max_message_size is not None:
        return min(device.max_message_size, listener.max_message_size)
    return listener.max_message_size


def max_recipients(device: DeviceSettings, listener: ListenerSettings) -> int:
    if device.max_recipients is not None:
        return min(device.max_recipients, listener.max_recipients)
    return listener.max_recipients


class RateLimiter:
    """Per-device sliding one-minute window of accepted messages."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[str, deque[float]] = {}

    def _window(self, device: str) -> deque[float]:
        q = self._seen.setdefault(device, deque())
        cutoff = self._clock() - 60.0
        while q and q[0] <= cutoff:
            q.popleft()
        return q

    def reply(self, device: DeviceSettings) -> str | None:
        limit = device.max_messages_per_minute
        if limit is not None and len(self._window(device.name)) >= limit:
            return f"450 4.7.1 Device {device.name} is over its limit of {limit} messages/minute"
        return None

    def accepted(self, device: DeviceSettings) -> None:
        if device.max_messages_per_minute is not None:
            self._window(device.name).append(self._clock())
