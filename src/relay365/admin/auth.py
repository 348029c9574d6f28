"""Who is asking, and may they: sessions (cookie) or API tokens (``Authorization: Bearer``), roles,
CSRF on every state change made with a cookie, and the login itself (throttled, audited)."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from relay365.admin.accounts import AccountStore, Principal
from relay365.admin.forms import form
from relay365.admin.sessions import LoginThrottle, Session, SessionStore
from relay365.observability.tracking import EventKind, TrackingEvent, TrackingLog

log = logging.getLogger(__name__)
COOKIE = "relay365_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class NotLoggedIn(Exception):
    """No valid session or token: pages redirect to the login page, the API answers 401."""


class Forbidden(Exception):
    """Logged in, but not allowed (role, CSRF): 403."""


class LockedOut(Exception):
    def __init__(self, wait: float) -> None:
        self.wait = wait
        super().__init__(f"too many failed logins; try again in {int(wait) + 1} s")


@dataclass(frozen=True, slots=True)
class Caller:
    principal: Principal
    session: Session | None  # None for API tokens

    @property
    def csrf(self) -> str:
        return self.session.csrf if self.session else ""


class Guard:
    def __init__(
        self,
        *,
        accounts: AccountStore,
        sessions: SessionStore,
        throttle: LoginThrottle,
        tracking: TrackingLog,
        secure_cookie: bool,
    ) -> None:
        self.accounts = accounts
        self.sessions = sessions
        self.throttle = throttle
        self.tracking = tracking
        self.secure_cookie = secure_cookie

    def caller(self, request: Request) -> Caller | None:
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            principal = self.accounts.check_token(auth[7:])
            return Caller(principal, None) if principal else None
        sid = request.cookies.get(COOKIE)
        session = self.sessions.get(sid) if sid else None
        if session is None:
            return None
        role = self.accounts.role_of(session.name)
        if role is None:  # the account was removed: its sessions end
            self.sessions.end(session.id)
            return None
        return Caller(Principal(session.name, role, "session"), session)

    async def require(self, request: Request, *, operator: bool = False) -> Caller:
        """The caller, or NotLoggedIn/Forbidden. A state change (any method but GET/HEAD) by a
        session must carry its CSRF token (form field ``csrf`` or header ``X-CSRF-Token``)."""
        c = self.caller(request)
        if c is None:
            raise NotLoggedIn
        if operator and not c.principal.can_act:
            raise Forbidden(f"{c.principal.name} is a viewer: only operators may do this")
        if request.method not in SAFE_METHODS and c.session is not None:
            sent = request.headers.get("x-csrf-token")
            if sent is None:
                sent = (await form(request)).get("csrf", "")
            if not sent or not hmac.compare_digest(sent, c.session.csrf):
                raise Forbidden("missing or wrong CSRF token: reload the page and try again")
        return c

    async def login(self, name: str, password: str, *, address: str) -> Session:
        wait = self.throttle.locked(account=name, address=address)
        if wait > 0:
            log.warning("console login refused (locked out) user=%r peer=%s", name[:64], address)
            raise LockedOut(wait)
        principal = await self.accounts.verify(name, password)
        if principal is None:
            self.throttle.failed(account=name, address=address)
            log.warning("console login failed user=%r peer=%s", name[:64], address)
            self.audit(name[:64], f"login failed from {address}", address=address)
            raise NotLoggedIn
        self.throttle.succeeded(account=name)
        log.info("console login user=%s peer=%s", name, address)
        self.audit(name, f"logged in from {address}", address=address)
        return self.sessions.create(principal.name)

    def set_cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            session.id,
            httponly=True,
            samesite="strict",
            secure=self.secure_cookie,
            path="/",
        )

    def logout(self, request: Request, response: Response) -> None:
        sid = request.cookies.get(COOKIE)
        if sid:
            self.sessions.end(sid)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=self.secure_cookie)

    def audit(self, actor: str, what: str, *, address: str = "", kind: EventKind = EventKind.ADMIN) -> None:
        self.tracking.record(
            TrackingEvent(kind=kind, at=self.throttle.clock(), actor=actor, peer=address, detail=what)
        )
