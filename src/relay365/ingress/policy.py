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

from relay365.settings import NULL_SENDER, DeviceSettings, ListenerSettings

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


def address_reply(
    raw_arg: str, address: str, *, what: str, fqdn: bool = True, smtputf8: bool = False
) -> str | None:
    """Refuse relay tricks and malformed addresses. ``raw_arg`` is the text after ``FROM:``/``TO:``.
    ``fqdn``: the address goes upstream, so its domain must be fully qualified (Postfix's
    reject_non_fqdn_sender/recipient); a device whose sender is rewritten may use ``root@printer``.
    ``smtputf8``: MAIL had the SMTPUTF8 parameter, so the addresses may be non-ASCII."""
    if any(c in raw_arg for c in "\r\n\x00"):
        return "501 5.5.2 Control characters in address"
    if raw_arg.lstrip().startswith("<@"):
        return "553 5.1.3 Source routes are not accepted"
    if what == "sender" and address == "":
        return None
    if not smtputf8 and not address.isascii():
        # RFC 6531 3.4 / 3.5: a non-ASCII address needs the SMTPUTF8 parameter on MAIL.
        return f"553 5.6.7 Non-ASCII {what} address needs SMTPUTF8 (RFC 6531)"
    local, _, _domain = address.rpartition("@")
    if not local or len(local) > MAX_LOCAL_PART or len(address) > MAX_ADDRESS:
        return f"553 5.1.3 Bad {what} address syntax"
    if not _ADDRESS.match(address) or "%" in local or "!" in local or '"' in local:
        return f"553 5.1.3 Bad {what} address syntax (relay forms are not accepted)"
    if fqdn and "." not in address.rpartition("@")[2]:
        return f"504 5.5.2 <{address}>: {what.capitalize()} address rejected: need fully-qualified address"
    return None


def _matches(pattern: str, address: str) -> bool:
    """``*`` is any sender, the null sender ``<>`` included (it names no one, so it spoofs no one);
    ``<>`` is the null sender only; an address or ``@domain`` never matches the null sender."""
    a = address.lower()
    if pattern == "*":
        return True
    if not a:
        return pattern == NULL_SENDER
    if pattern.startswith("@"):
        return a.endswith(pattern)
    return a == pattern


def sender_reply(device: DeviceSettings, address: str) -> str | None:
    """``address`` is ``""`` for the null sender."""
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


# RFC 2034: with ENHANCEDSTATUSCODES advertised, replies carry an RFC 3463 status. aiosmtpd's own
# replies ("500 Error: bad syntax", "503 Error: send HELO first", ...) get the one their code means.
_STATUS = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?:[ ]|$)")
_DEFAULT_STATUS = {
    "421": "4.3.0",  # service not available
    "451": "4.3.0",  # local error in processing
    "454": "4.7.0",  # TLS not available / temporary authentication failure (RFC 3207, RFC 4954)
    "500": "5.5.2",  # syntax error, command unrecognised
    "501": "5.5.4",  # syntax error in parameters or arguments
    "502": "5.5.1",  # command not implemented
    "503": "5.5.1",  # bad sequence of commands
    "504": "5.5.4",  # command parameter not implemented
    "530": "5.7.0",  # authentication required (RFC 4954)
    "535": "5.7.8",  # authentication credentials invalid (RFC 4954)
    "552": "5.3.4",  # message too big
    "553": "5.1.3",  # mailbox name not allowed: bad address syntax
    "555": "5.5.4",  # MAIL/RCPT parameters not recognised (RFC 5321 4.1.1.11)
}


def with_status(reply: str) -> str:
    """``reply`` with an enhanced status code (RFC 3463) after the basic code, if it has none."""
    if len(reply) < 4 or _STATUS.match(reply):
        return reply
    code = reply[:3]
    status = _DEFAULT_STATUS.get(code, f"{code[0]}.0.0")
    return f"{code}{reply[3]}{status} {reply[4:]}".rstrip()


def status_of(reply: str) -> str:
    """The enhanced status code of a reply (``5.7.1``), or ``""``."""
    m = _STATUS.match(reply)
    return m.group(0)[4:].strip() if m else ""
