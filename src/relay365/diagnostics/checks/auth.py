"""Auth checks for the OAuth transports: token acquisition, XOAUTH2 on submission, a Graph probe.

* Token: through the relay's own :class:`~relay365.oauth.TokenSource` (the transport's settings), so the
  check fails exactly where the relay would. The token's payload is decoded *without* verifying it, only
  to show the permissions it carries (``roles`` for app-only tokens, ``scp`` for delegated ones).
* Submission: connect, STARTTLS, ``AUTH XOAUTH2`` with that token (aiosmtplib): 235 passes.
* Graph: ``POST /users/{mailbox}/sendMail`` with a message that has no recipients. Graph checks the
  token, the Mail.Send permission and the mailbox scope (RBAC for Applications) first, then refuses the
  empty message with ``400 ErrorInvalidRecipients``: that answer proves the permission and sends nothing.
  (``GET /users/{id}`` would need User.Read.All, which a relay app does not and should not have.)
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import aiosmtplib
import httpx
import jwt

from relay365.diagnostics.checks.result import CheckResult, failed, passed, warned
from relay365.errors import Relay365Error
from relay365.oauth import GRAPH_SCOPE, SMTP_SCOPE, token_source
from relay365.replies import summary
from relay365.settings import TransportSettings

log = logging.getLogger(__name__)

# Application permissions each transport needs in an app-only token (exchange-online.md).
NEEDED_ROLES = {"submission": "SMTP.SendAsApp", "graph": "Mail.Send"}
_TOKEN_FIX = {
    "AADSTS7000215": "The client secret is wrong: copy the secret's Value (not its ID) from the app "
    "registration into the variable named by client_secret_env",
    "AADSTS7000222": "The client secret expired: create a new one in Entra (App registrations > "
    "Certificates & secrets)",
    "AADSTS700016": "No app with this client_id in this tenant: check client_id and tenant",
    "AADSTS90002": "Tenant not found: check tenant (directory id or domain)",
}


def claims(token: str) -> dict[str, Any]:
    """The JWT payload, decoded without verifying the signature (display only)."""
    try:
        data = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}
    return data if isinstance(data, dict) else {}


def _permissions(data: dict[str, Any]) -> str:
    roles = data.get("roles")
    if isinstance(roles, list) and roles:
        return "roles: " + ", ".join(str(r) for r in roles)
    scp = data.get("scp")
    return f"scp: {scp}" if scp else "no roles or scp claim"


def _token_fix(text: str) -> str:
    for code, fix in _TOKEN_FIX.items():
        if code in text:
            return fix
    if "invalid_grant" in text:
        return "The signed-in user's refresh token is no longer valid: run 'relay365 login' again"
    return "Check tenant, client_id, the secret or certificate, and that the authority is reachable"


async def check_token(transport: TransportSettings) -> tuple[str | None, list[CheckResult]]:
    """Acquire a token for the transport; returns it (or None) and the result rows."""
    name = f"Token {transport.name} ({transport.m365.client_id})"
    scope = GRAPH_SCOPE if transport.type == "graph" else SMTP_SCOPE
    try:
        source = token_source(transport, scope=scope)
    except Relay365Error as exc:
        return None, [failed(name, str(exc), "Set the secret (client_secret_env / _file) or certificate")]
    try:
        token = await source.token()
    except Relay365Error as exc:
        return None, [failed(name, str(exc), _token_fix(str(exc)))]
    finally:
        source.close()
    data = claims(token)
    results = [passed(name, f"token for {data.get('aud', scope)}; {_permissions(data)}")]
    needed = NEEDED_ROLES.get(transport.type)
    roles = data.get("roles")
    if needed and isinstance(roles, list) and needed not in roles:
        results.append(
            warned(
                f"Permission {needed} {transport.name}",
                f"the app-only token lacks {needed} ({_permissions(data)})",
                f"Add the application permission {needed} in Entra and grant admin consent",
            )
        )
    return token, results


def _tls_context(transport: TransportSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(transport.ca_file) if transport.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not transport.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def check_xoauth2(transport: TransportSettings, token: str, *, timeout_s: float) -> CheckResult:
    """STARTTLS (or implicit TLS) and ``AUTH XOAUTH2`` as the transport's mailbox: pass on 235."""
    where = f"{transport.host}:{transport.port}"
    name = f"AUTH XOAUTH2 {transport.m365.mailbox} at {where}"
    implicit = transport.tls == "implicit"
    smtp = aiosmtplib.SMTP(
        hostname=transport.host,
        port=transport.port,
        use_tls=implicit,
        start_tls=not implicit,
        tls_context=_tls_context(transport),
        timeout=timeout_s,
    )
    try:
        await smtp.connect()
        reply = await smtp.auth_xoauth2(transport.m365.mailbox or "", token)
    except aiosmtplib.SMTPResponseException as exc:
        line = f"{exc.code} {exc.message}"
        return failed(name, line, summary(line))
    except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
        return failed(name, f"{type(exc).__name__}: {exc}", "Check the TCP and TLS rows for this endpoint")
    finally:
        if smtp.is_connected:
            try:
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError):
                smtp.close()
    if reply.code == 235:
        return passed(name, f"{reply.code} {reply.message}")
    line = f"{reply.code} {reply.message}"
    return failed(name, line, summary(line))


def _graph_error(response: httpx.Response) -> tuple[str, str]:
    try:
        err = response.json().get("error", {})
    except ValueError:
        return "", response.text[:200]
    if not isinstance(err, dict):
        return "", str(err)[:200]
    return str(err.get("code", "")), str(err.get("message", ""))[:300]


_GRAPH_FIX = {
    401: "The token was refused: check tenant, and that the token is for https://graph.microsoft.com",
    403: "Grant the application permission Mail.Send (admin consent) and include the mailbox in the "
    "app's RBAC for Applications / application access policy scope",
    404: "The mailbox does not exist, is unlicensed or is not in Exchange Online: check mailbox",
}


async def check_graph(transport: TransportSettings, token: str, *, timeout_s: float) -> CheckResult:
    """The permission probe: sendMail with no recipients; 400 ErrorInvalidRecipients means allowed."""
    mailbox = transport.m365.mailbox or ""
    url = f"{transport.m365.graph_url}/users/{mailbox}/sendMail"
    name = f"Graph Mail.Send {mailbox}"
    body = {"message": {"subject": "relay365 doctor permission probe"}, "saveToSentItems": False}
    private = transport.ca_file is not None or not transport.verify
    verify: ssl.SSLContext | bool = _tls_context(transport) if private else True
    try:
        async with httpx.AsyncClient(verify=verify, timeout=timeout_s, trust_env=not private) as c:
            response = await c.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        return failed(name, f"{url}: {type(exc).__name__}: {exc}", "Check the TCP and TLS rows for Graph")
    code, message = _graph_error(response)
    status = response.status_code
    if status == 400:  # past the token, permission and mailbox checks: only the empty message refused
        return passed(name, f"allowed (the recipient-less probe was refused: {code}; nothing sent)")
    if status in (200, 202):
        return passed(name, f"{status}: allowed")
    detail = f"{status} {code}: {message}".strip()
    return failed(name, detail, _GRAPH_FIX.get(status, "See Graph's error code and message"))


async def check_send_as_smtp(
    transport: TransportSettings, token: str, addresses: tuple[str, ...], *, timeout_s: float
) -> list[CheckResult]:
    """``MAIL FROM:<address>`` after ``AUTH XOAUTH2``, then ``RSET``: Exchange Online answers
    ``550 5.7.60`` at MAIL FROM when the mailbox has no Send As on the address. Nothing is sent."""
    results: list[CheckResult] = []
    smtp = aiosmtplib.SMTP(
        hostname=transport.host,
        port=transport.port,
        use_tls=transport.tls == "implicit",
        start_tls=transport.tls != "implicit",
        tls_context=_tls_context(transport),
        timeout=timeout_s,
    )
    mailbox = transport.m365.mailbox or ""
    try:
        await smtp.connect()
        await smtp.auth_xoauth2(mailbox, token)
        for address in addresses:
            name = f"Send As {address} ({mailbox})"
            reply = await smtp.execute_command(b"MAIL", f"FROM:<{address}>".encode())
            line = f"{reply.code} {reply.message}"
            if reply.code == 250:
                results.append(passed(name, f"MAIL FROM accepted ({line}); nothing sent"))
            else:
                results.append(failed(name, line, summary(line)))
            await smtp.rset()
    except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
        results.append(
            warned(
                f"Send As ({mailbox})", f"could not probe: {type(exc).__name__}: {exc}", "See the AUTH row"
            )
        )
    finally:
        if smtp.is_connected:
            try:
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError):
                smtp.close()
    return results


async def check_send_as_graph(
    transport: TransportSettings, token: str, addresses: tuple[str, ...], *, timeout_s: float
) -> list[CheckResult]:
    """sendMail as ``address`` with no recipients: ``403 ErrorSendAsDenied`` means the mailbox has no
    Send As on it; the refusal of the recipient-less message means Graph let the sender pass.
    Nothing is sent either way."""
    mailbox = transport.m365.mailbox or ""
    url = f"{transport.m365.graph_url}/users/{mailbox}/sendMail"
    private = transport.ca_file is not None or not transport.verify
    verify: ssl.SSLContext | bool = _tls_context(transport) if private else True
    results = []
    async with httpx.AsyncClient(verify=verify, timeout=timeout_s, trust_env=not private) as client:
        for address in addresses:
            name = f"Send As {address} ({mailbox}, Graph)"
            body = {
                "message": {
                    "subject": "relay365 doctor Send As probe",
                    "from": {"emailAddress": {"address": address}},
                },
                "saveToSentItems": False,
            }
            try:
                response = await client.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
            except httpx.HTTPError as exc:
                results.append(warned(name, f"could not probe: {type(exc).__name__}", "See the Graph rows"))
                continue
            code, message = _graph_error(response)
            line = f"{response.status_code} {code}: {message}".strip()
            if response.status_code == 403 and code == "ErrorSendAsDenied":
                results.append(failed(name, line, summary(line)))
            elif response.status_code == 400:
                results.append(passed(name, f"Graph let the sender pass ({code}); nothing sent"))
            else:
                results.append(warned(name, line, "See Graph's error code and message"))
    return results
