"""HTTP hardening for the console, as one ASGI middleware in front of everything:

* Host allow-list: a request whose ``Host`` is not the console's own name gets 400 (DNS rebinding: a
  page on attacker.example that resolves its name to 127.0.0.1 sends ``Host: attacker.example``);
* a state change (any method but GET/HEAD/OPTIONS) whose ``Origin`` is another site gets 403, before
  any handler runs (OWASP CSRF cheat sheet, "Verifying Origin With Standard Headers"; the login form
  has no session token yet, and this also stops login CSRF);
* response headers: a Content-Security-Policy without inline script (scripts only from our own
  files), no framing by others, no MIME sniffing, no referrer to other sites, no caching of admin
  data, HSTS under TLS. A response that sets its own CSP (the sandboxed message HTML) keeps it.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
    " frame-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
)
# Message HTML from devices and mailboxes: no script, no remote loads, no forms, unique origin.
SANDBOX_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src data:;"
    " frame-ancestors 'self'; form-action 'none'; base-uri 'none'; sandbox"
)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


def host_name(header: str) -> str:
    """``Host`` without its port, lower case: ``[::1]:8080`` -> ``[::1]``, ``a.b:80`` -> ``a.b``."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[: h.find("]") + 1] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, *, allowed_hosts: Iterable[str], tls: bool) -> None:
        self.app = app
        self.allowed = {h.lower() for h in allowed_hosts} | set(LOOPBACK_HOSTS)
        self.allowed |= {f"[{h}]" for h in list(self.allowed) if ":" in h and not h.startswith("[")}
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if host not in self.allowed:
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                }
            )
            await send({"type": "http.response.body", "body": b"Invalid Host header\n"})
            return
        origin = headers.get(b"origin")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and origin is not None:
            netloc = urllib.parse.urlsplit(origin.decode("latin-1")).netloc
            if host_name(netloc) not in self.allowed:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                    }
                )
                await send({"type": "http.response.body", "body": b"Cross-site request refused\n"})
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = list(message.get("headers", []))
                names = {k.lower() for k, _ in out}
                extra = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),  # "no-referrer" would make every Origin "null"
                    (b"cache-control", b"no-store"),
                ]
                if b"content-security-policy" not in names:
                    extra += [(b"content-security-policy", CSP.encode()), (b"x-frame-options", b"DENY")]
                if self.tls:
                    extra.append((b"strict-transport-security", b"max-age=31536000"))
                out += [(k, v) for k, v in extra if k not in names]
                message = {**message, "headers": out}
            await send(message)

        await self.app(scope, receive, send_with_headers)
