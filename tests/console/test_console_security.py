"""The console's security rules over real HTTP: login required, Host allow-list, CSRF, roles, login
lockout per account and per address, CSP and cookie flags, TLS, the audit log."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from pathlib import Path

import httpx

from relay365.observability.tracking import EventKind, TraceQuery
from tests.console.support import OPERATOR, VIEWER, bearer, login, running_console
from tests.support import closed_port, smarthost

HELD_UPSTREAM = {
    "transport": [smarthost(closed_port())],
    "delivery": {"min_backoff": 600, "max_backoff": 600, "poll_interval": 0.1},
}


def send(port: int, rcpt: str = "bob@contoso.com", subject: str = "scan") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail(
            "scan@contoso.com", [rcpt], f"Subject: {subject}\r\nMessage-ID: <m1@x>\r\n\r\nx\r\n".encode()
        )


async def test_login_required_everywhere_but_health(tmp_path: Path) -> None:
    async with running_console(tmp_path) as c, c.client() as http:
        assert (await http.get("/api/health")).status_code == 200
        for path in ("/api/queue", "/api/trace", "/api/overview", "/api/devices", "/api/events"):
            r = await http.get(path)
            assert r.status_code == 401 and "log in" in r.json()["error"], path
        page = await http.get("/queue?state=deferred")
        assert page.status_code == 303
        assert page.headers["location"] == "/login?next=%2Fqueue%3Fstate%3Ddeferred"
        assert (await http.post("/api/queue/ABC/delete")).status_code == 401
        assert (await http.get("/api/queue", headers=bearer("r365_00000000_" + "x" * 43))).status_code == 401


async def test_host_header_allow_list(tmp_path: Path) -> None:
    """DNS rebinding: a page on attacker.example that resolves to 127.0.0.1 sends its own Host."""
    async with (
        running_console(tmp_path, admin={"allowed_hosts": ["relay.example.org"]}) as c,
        c.client() as http,
    ):
        port = c.relay.admin.port if c.relay.admin else 0
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.2", ""):
            r = await http.get("/api/health", headers={"host": host})
            assert r.status_code == 400 and "Invalid Host" in r.text, host
        for host in (
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            "relay.example.org",
            f"RELAY.example.org:{port}",
        ):
            assert (await http.get("/api/health", headers={"host": host})).status_code == 200, host


async def test_headers_cookie_and_csrf(tmp_path: Path) -> None:
    async with running_console(tmp_path, **HELD_UPSTREAM) as c, c.client() as http:
        await asyncio.to_thread(send, c.relay.ports["lan"])
        r = await http.post("/login", data={"username": OPERATOR[0], "password": OPERATOR[1], "next": "/"})
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
        page = await http.get("/")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
        assert "frame-ancestors 'none'" in csp and page.headers["x-frame-options"] == "DENY"
        assert "<script>" not in page.text and '<script src="/static/console.js"' in page.text
        assert page.headers["x-content-type-options"] == "nosniff"
        csrf = await login(http, OPERATOR)
        qid = (await http.get("/api/queue")).json()["messages"][0]["queue_id"]
        # A state change without the token, with a wrong one, then with the right one.
        assert (await http.post(f"/api/queue/{qid}/hold")).status_code == 403
        assert (
            await http.post(f"/api/queue/{qid}/hold", headers={"x-csrf-token": "nope"})
        ).status_code == 403
        # A cross-site form post is refused by its Origin before anything else, even with the token.
        cross = await http.post(
            "/queue/action",
            data={"action": "hold", "id": qid, "csrf": csrf},
            headers={"origin": "https://attacker.example"},
        )
        assert cross.status_code == 403 and "Cross-site" in cross.text
        login_csrf = await http.post(
            "/login", data={"username": "x", "password": "y"}, headers={"origin": "null"}
        )
        assert login_csrf.status_code == 403
        form = await http.post("/queue/action", data={"action": "hold", "id": qid, "csrf": "nope"})
        assert form.status_code == 403 and "CSRF" in form.text
        assert not (await http.get(f"/api/queue/{qid}")).json()["entry"]["held"]
        ok = await http.post("/queue/action", data={"action": "hold", "id": qid, "csrf": csrf})
        assert ok.status_code == 303
        assert (await http.get(f"/api/queue/{qid}")).json()["entry"]["held"]
        ok = await http.post(f"/api/queue/{qid}/release", headers={"x-csrf-token": csrf})
        assert ok.status_code == 200 and ok.json()["done"] == [qid]
        # Logging out ends the session on the server, not only in the browser.
        sid = http.cookies["relay365_session"]
        assert (await http.post("/logout", data={"csrf": csrf})).status_code == 303
        http.cookies.set("relay365_session", sid)
        assert (await http.get("/api/queue")).status_code == 401


async def test_roles_viewer_cannot_act_and_audit_log(tmp_path: Path) -> None:
    async with running_console(tmp_path, **HELD_UPSTREAM) as c, c.client() as viewer, c.client() as op:
        await asyncio.to_thread(send, c.relay.ports["lan"])
        csrf = await login(viewer, VIEWER)
        qid = (await viewer.get("/api/queue")).json()["messages"][0]["queue_id"]
        r = await viewer.post(f"/api/queue/{qid}/delete", headers={"x-csrf-token": csrf})
        assert r.status_code == 403 and "viewer" in r.json()["error"]
        page = await viewer.post("/queue/action", data={"action": "delete", "id": qid, "csrf": csrf})
        assert page.status_code == 403
        assert (await viewer.get(f"/api/queue/{qid}/raw")).status_code == 403
        assert 'value="delete"' not in (await viewer.get("/queue")).text  # no buttons for viewers
        assert (await viewer.get(f"/api/queue/{qid}")).status_code == 200
        # A viewer token may read, not act; an operator token acts without CSRF (no cookie involved).
        assert (await op.post(f"/api/queue/{qid}/delete", headers=bearer(c.viewer_token))).status_code == 403
        raw = await op.get(f"/api/queue/{qid}/raw", headers=bearer(c.token))
        assert raw.status_code == 200 and b"Subject: scan" in raw.content
        assert raw.headers["content-type"] == "message/rfc822"
        r = await op.post(f"/api/queue/{qid}/delete", headers=bearer(c.token))
        assert r.status_code == 200 and r.json()["done"] == [qid]
        assert (await op.get(f"/api/queue/{qid}", headers=bearer(c.token))).json()["entry"] is None
        await c.relay.tracking.flush()
        audit = await c.relay.tracking.search(TraceQuery(queue_id=qid, kinds=(EventKind.DELETED,)))
        [deleted] = audit.events
        assert deleted.actor == "token:automation" and deleted.peer == "127.0.0.1"
        assert deleted.recipient == "bob@contoso.com" and deleted.subject == "scan"
        logins = await c.relay.tracking.search(TraceQuery(kinds=(EventKind.ADMIN,)))
        assert any(e.actor == VIEWER[0] and "logged in" in e.detail for e in logins.events)
        assert any("downloaded message " + qid in e.detail for e in logins.events)


async def test_login_lockout_per_account_and_per_address(tmp_path: Path) -> None:
    admin = {"login_failures": 3, "lockout_seconds": 600}
    async with running_console(tmp_path, admin=admin) as c, c.client() as http:
        for _ in range(3):
            r = await http.post("/login", data={"username": OPERATOR[0], "password": "wrong"})
            assert r.status_code == 401 and "Wrong user name or password" in r.text
        # The right password does not lift the lockout, and no password is checked meanwhile.
        r = await http.post("/login", data={"username": OPERATOR[0], "password": OPERATOR[1]})
        assert r.status_code == 429 and "too many failed logins" in r.text
        # The address is locked out too (password spraying over many accounts from one address).
        r = await http.post("/login", data={"username": VIEWER[0], "password": VIEWER[1]})
        assert r.status_code == 429
        guard = c.relay.console.guard if c.relay.console else None
        assert guard is not None
        # Another address may still log in to another account: per-address and per-account counts.
        assert guard.throttle.locked(account=VIEWER[0], address="127.0.0.9") == 0
        assert guard.throttle.locked(account=OPERATOR[0], address="127.0.0.9") > 0


async def test_lockout_ends_after_the_lockout_time(tmp_path: Path) -> None:
    from tests.support import Clock

    clock = Clock()
    admin = {"login_failures": 2, "lockout_seconds": 60}
    async with running_console(tmp_path, admin=admin, relay_kwargs={"clock": clock}) as c, c.client() as http:
        for _ in range(2):
            await http.post("/login", data={"username": OPERATOR[0], "password": "wrong"})
        assert (
            await http.post("/login", data={"username": OPERATOR[0], "password": OPERATOR[1]})
        ).status_code == 429
        clock.advance(61)
        assert (
            await http.post("/login", data={"username": OPERATOR[0], "password": OPERATOR[1]})
        ).status_code == 303


async def test_metrics_open_on_loopback_unless_configured(tmp_path: Path) -> None:
    async with running_console(tmp_path) as c, c.client() as http:
        assert (await http.get("/metrics")).status_code == 200
    async with running_console(tmp_path / "closed", admin={"open_metrics": False}) as c, c.client() as http:
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers=bearer(c.viewer_token))).status_code == 200


async def test_console_over_tls_sets_secure_cookie(
    tmp_path: Path, ca_file: Path, server_cert: tuple[Path, Path]
) -> None:
    cert, key = server_cert
    admin = {"tls": True, "cert_file": str(cert), "key_file": str(key)}
    async with running_console(tmp_path, admin=admin) as c:
        assert c.base.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(ca_file))
        async with httpx.AsyncClient(base_url=c.base, trust_env=False, verify=ctx, timeout=20) as http:
            r = await http.post("/login", data={"username": OPERATOR[0], "password": OPERATOR[1]})
            assert r.status_code == 303 and "secure" in r.headers["set-cookie"].lower()
            assert r.headers["strict-transport-security"].startswith("max-age=")
        async with httpx.AsyncClient(base_url=c.base.replace("https", "http"), trust_env=False) as plain:
            try:
                await plain.get("/api/health")
                raise AssertionError("the TLS console answered plain HTTP")
            except httpx.HTTPError:
                pass


async def test_console_tls_self_signed_by_default(tmp_path: Path) -> None:
    async with running_console(tmp_path, admin={"tls": True}) as c, c.client() as http:
        assert (await http.get("/api/health")).status_code == 200
        assert (tmp_path / "spool" / "tls").is_dir()


async def test_open_redirect_refused(tmp_path: Path) -> None:
    async with running_console(tmp_path) as c, c.client() as http:
        for target in ("https://attacker.example/", "//attacker.example/", "/\\attacker.example"):
            r = await http.post(
                "/login", data={"username": OPERATOR[0], "password": OPERATOR[1], "next": target}
            )
            assert r.status_code == 303 and r.headers["location"] == "/", target
