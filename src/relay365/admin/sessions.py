"""Console sessions and the login throttle.

Sessions live in memory: a restart logs everyone out, which is what an admin expects of a service
restart, and nothing about a session sits on disk. The cookie holds only the random session id
(256 bits); the CSRF token (OWASP's synchronizer token pattern) is a second random value bound to the
session and sent in every form and in the ``X-CSRF-Token`` header of script requests.

The throttle counts failed logins per account and per client address (OWASP Authentication Cheat
Sheet, "Login Throttling"): after ``limit`` failures within ``lockout`` seconds that account or that
address is refused, without a password check, until ``lockout`` seconds after the last failure. A
success clears only that account's count, so an address spraying passwords stays locked out.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_SESSIONS = 10_000
IDLE_SECONDS = 2 * 3600.0  # a session unused this long ends (the absolute limit is session_hours)
MAX_TRACKED = 10_000  # throttle keys remembered


@dataclass(slots=True)
class Session:
    id: str
    name: str
    csrf: str
    created: float
    last_seen: float


class SessionStore:
    def __init__(self, *, lifetime: float, clock: Callable[[], float] = time.time) -> None:
        self._lifetime = lifetime
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def create(self, name: str) -> Session:
        now = self._clock()
        if len(self._sessions) >= MAX_SESSIONS:
            self._expire(now)
            if len(self._sessions) >= MAX_SESSIONS:
                oldest = min(self._sessions.values(), key=lambda s: s.last_seen)
                del self._sessions[oldest.id]
        s = Session(secrets.token_urlsafe(32), name, secrets.token_urlsafe(32), now, now)
        self._sessions[s.id] = s
        return s

    def get(self, session_id: str) -> Session | None:
        s = self._sessions.get(session_id)
        if s is None:
            return None
        now = self._clock()
        if now - s.created > self._lifetime or now - s.last_seen > IDLE_SECONDS:
            del self._sessions[session_id]
            return None
        s.last_seen = now
        return s

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def _expire(self, now: float) -> None:
        for sid, s in list(self._sessions.items()):
            if now - s.created > self._lifetime or now - s.last_seen > IDLE_SECONDS:
                del self._sessions[sid]


@dataclass
class LoginThrottle:
    limit: int = 5
    lockout: float = 900.0
    clock: Callable[[], float] = time.time
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._failures.get(key)
        if q is None:
            return deque()
        while q and q[0] <= now - self.lockout:
            q.popleft()
        if not q:
            del self._failures[key]
        return q

    def locked(self, *, account: str, address: str) -> float:
        """Seconds until a login for ``account`` from ``address`` may be tried again (0: now)."""
        now = self.clock()
        wait = 0.0
        for key in (f"user:{account.lower()}", f"addr:{address}"):
            q = self._recent(key, now)
            if len(q) >= self.limit:
                wait = max(wait, q[-1] + self.lockout - now)
        return wait

    def failed(self, *, account: str, address: str) -> None:
        now = self.clock()
        if len(self._failures) >= MAX_TRACKED:
            for key in list(self._failures):
                self._recent(key, now)
        for key in (f"user:{account.lower()}", f"addr:{address}"):
            self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, *, account: str) -> None:
        self._failures.pop(f"user:{account.lower()}", None)
