"""SMTP AUTH as devices send it (RFC 4954): PLAIN (RFC 4616) and LOGIN, any case, with or without an
initial response, checked against the brute-force guard before any password is verified.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from relay365.ingress.identity import AuthGuard, DeviceDirectory
from relay365.settings import DeviceSettings

AUTH_LINE_LIMIT = 12288  # RFC 4954 4: an AUTH line may be up to 12288 octets
USERNAME_PROMPT = "VXNlcm5hbWU6"  # base64("Username:"), what LOGIN clients expect
PASSWORD_PROMPT = "UGFzc3dvcmQ6"  # base64("Password:")
BLOCKED = "454 4.7.0 Too many authentication failures; try again later"  # RFC 4954 6
INVALID = "535 5.7.8 Authentication credentials invalid"  # RFC 4954 6
# RFC 4616 2: the server must verify that the user may act as the authorization identity; a device
# acts only as itself, so any other identity is refused rather than silently ignored.
OTHER_AUTHZID = (
    "535 5.7.8 Authentication credentials invalid: the authorization identity must be empty"
    " or the user name (RFC 4616 2)"
)


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = ""
    authzid: str = ""  # PLAIN's authorization identity ("" = act as username)

    @property
    def acts_as_other(self) -> bool:
        return bool(self.authzid) and self.authzid.lower() != self.username.lower()


def b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("bad base64") from None


def plain(blob: str) -> Credentials:
    """RFC 4616 2: ``[authzid] NUL authcid NUL passwd``, each UTF-8."""
    fields = b64decode(blob).split(b"\x00")
    if len(fields) != 3:
        raise ValueError("PLAIN needs authzid NUL authcid NUL passwd")
    authzid, username, password = (f.decode("utf-8") for f in fields)
    return Credentials(username, password, authzid)


Ask = Callable[[str], Awaitable[str | None]]  # send a 334 challenge, get the response (None: "*")


async def read_credentials(mechanism: str, initial: str | None, ask: Ask) -> Credentials | None:
    """The credentials of one AUTH exchange; None when the client cancels. Raises ValueError for
    a response that does not decode."""
    if mechanism == "PLAIN":
        blob = initial if initial is not None else await ask("")
        return None if blob is None else plain(blob)
    user_blob = initial if initial is not None else await ask(USERNAME_PROMPT)
    if user_blob is None:
        return None
    pass_blob = await ask(PASSWORD_PROMPT)
    if pass_blob is None:
        return None
    return Credentials(b64decode(user_blob).decode("utf-8"), b64decode(pass_blob).decode("utf-8"))


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    reply: str
    device: DeviceSettings | None = None  # set on success
    detail: str = ""  # for the log line of a refusal (the user name tried; never the password)


async def authenticate(
    mechanism: str,
    initial: str | None,
    *,
    ask: Ask,
    guard: AuthGuard,
    devices: DeviceDirectory,
    peer_ip: str,
    listener: str,
) -> AuthOutcome:
    """One AUTH exchange after its syntax was checked. A block (of the address, or of the user
    name) is checked before any password is verified and is answered 454; a failure after a delay."""
    if guard.blocked(peer_ip):
        return AuthOutcome(BLOCKED, detail="address blocked after repeated AUTH failures")
    try:
        creds = await read_credentials(mechanism, initial, ask)
    except (ValueError, UnicodeDecodeError):
        return AuthOutcome("501 5.5.2 Cannot decode response")
    if creds is None:
        return AuthOutcome("501 5.7.0 Authentication aborted")
    user = f"user={creds.username[:64]!r}"
    if creds.acts_as_other:
        return AuthOutcome(OTHER_AUTHZID, detail=f"{user} authzid={creds.authzid[:64]!r}")
    if not guard.begin(peer_ip, creds.username):
        return AuthOutcome(BLOCKED, detail=f"{user} blocked after repeated AUTH failures")
    device = None
    try:
        device = await devices.by_password(creds.username, creds.password, listener)
    finally:  # also when the client went away meanwhile: a guess is a guess
        if device is not None:
            guard.success(peer_ip, creds.username)
        else:
            delay = guard.failure(peer_ip, creds.username)
    if device is not None:
        return AuthOutcome("235 2.7.0 Authentication successful", device)
    await asyncio.sleep(delay)
    return AuthOutcome(INVALID, detail=user)
