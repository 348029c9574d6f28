"""The sandbox's Microsoft identity platform (v2.0 endpoints), enough for the real ``msal``.

Routes (``{tenant}`` is the tenant id, its name or one of its accepted domains)::

    GET  /{tenant}/v2.0/.well-known/openid-configuration   OIDC discovery (msal reads it first)
    GET  /{tenant}/discovery/v2.0/keys                    signing keys (JWKS)
    GET  /common/discovery/instance                       instance discovery (only if msal is
                                                          given this URL as ``instance_discovery``)
    POST /{tenant}/oauth2/v2.0/token                      client_credentials, refresh_token, device_code
    POST /{tenant}/oauth2/v2.0/devicecode                 device authorization (RFC 8628)

Errors are shaped as Entra returns them (https://learn.microsoft.com/entra/identity-platform/
reference-error-codes): ``{"error", "error_description": "AADSTSnnn: ...\\r\\nTrace ID: ...",
"error_codes", "timestamp", "trace_id", "correlation_id", "error_uri"}``, 400 or 401
(``invalid_client`` is 401). Refresh tokens are opaque, rotate on every use and, as in Entra, an
older one stays valid until it expires (90 days of inactivity) or the user's sessions are revoked.
Only SHA-256 digests of refresh tokens are kept; they are written next to the issuer's key file
(``refresh-grants.json``) when it has one, so they survive a restart. The user's sign-in for a
device code is simulated by :meth:`IdentityEndpoint.approve_device_code` (the admin API and the
``/devicelogin`` page in :mod:`relay365.sandbox.http` call it), checking ``Mailbox.password``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay365.errors import Relay365Error
from relay365.sandbox.tokens import (
    APP_ROLES,
    AssertionRejected,
    DelegatedScope,
    OAuthError,
    entra_timestamp,
    error_response,
    find_app,
    object_id,
    parse_delegated_scope,
    resolve_resource,
    resolve_tenant,
    verify_client_assertion,
)

if TYPE_CHECKING:
    from relay365.sandbox.context import SandboxContext
    from relay365.sandbox.tenant import AppRegistration

logger = logging.getLogger(__name__)

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
REFRESH_TOKEN_INACTIVITY = 90 * 24 * 3600.0  # Entra default refresh token inactivity lifetime
_USER_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


class DeviceCodeRefused(Relay365Error):
    """The simulated sign-in for a device code was refused (bad code or credentials)."""


@dataclass(frozen=True)
class _DeviceGrant:
    device_code: str
    user_code: str
    client_id: str
    scope: str
    expires_at: float
    upn: str | None = None
    redeemed: bool = False


@dataclass(frozen=True)
class _RefreshGrant:
    client_id: str
    upn: str
    issued_at: float
    last_used: float


def _missing(name: str) -> OAuthError:
    return OAuthError(
        400,
        "invalid_request",
        900144,
        f"The request body must contain the following parameter: '{name}'.",
    )


class IdentityEndpoint:
    """Token issuance for the sandbox tenant; state (device codes, refresh tokens) in memory."""

    def __init__(
        self,
        ctx: SandboxContext,
        *,
        device_code_interval: int = 5,
        device_code_lifetime: int = 900,
    ) -> None:
        self._ctx = ctx
        self._interval = device_code_interval
        self._device_lifetime = device_code_lifetime
        self._devices: dict[str, _DeviceGrant] = {}
        key_file = ctx.issuer.key_file
        self._grants_file = key_file.with_name("refresh-grants.json") if key_file else None
        self._refresh: dict[str, _RefreshGrant] = {}  # keyed by SHA-256 of the token
        self._tokens_valid_from: dict[str, float] = {}
        self._load_grants()

    def _load_grants(self) -> None:
        """Refresh grants of earlier runs (only token digests are ever written to disk)."""
        if self._grants_file is None or not self._grants_file.exists():
            return
        try:
            data = json.loads(self._grants_file.read_bytes())
            self._refresh = {k: _RefreshGrant(**v) for k, v in data["grants"].items()}
            self._tokens_valid_from = {str(k): float(v) for k, v in data["valid_from"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable %s: %s", self._grants_file, exc)

    def _save_grants(self) -> None:
        if self._grants_file is None:
            return
        data = {
            "grants": {k: asdict(v) for k, v in self._refresh.items()},
            "valid_from": self._tokens_valid_from,
        }
        tmp = self._grants_file.with_name(f".{self._grants_file.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(json.dumps(data).encode())
        os.replace(tmp, self._grants_file)

    def routes(self) -> list[Route]:
        return [
            Route("/common/discovery/instance", self.instance_discovery, methods=["GET"]),
            Route(
                "/{tenant}/v2.0/.well-known/openid-configuration",
                self.openid_configuration,
                methods=["GET"],
            ),
            Route("/{tenant}/discovery/v2.0/keys", self.keys, methods=["GET"]),
            Route("/{tenant}/oauth2/v2.0/token", self.token, methods=["POST"]),
            Route("/{tenant}/oauth2/v2.0/devicecode", self.devicecode, methods=["POST"]),
        ]

    # -- discovery ---------------------------------------------------------------------------

    def _base(self, request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}"

    async def openid_configuration(self, request: Request) -> Response:
        tenant = self._ctx.tenant
        if not resolve_tenant(tenant, request.path_params["tenant"]):
            return self._tenant_not_found(request)
        base = f"{self._base(request)}/{tenant.tenant_id}"
        config = {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": self._ctx.issuer.id_token_issuer,
            "request_uri_parameter_supported": False,
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nonce", "tid", "oid"],
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
        }
        return JSONResponse(config)

    async def keys(self, request: Request) -> Response:
        if not resolve_tenant(self._ctx.tenant, request.path_params["tenant"]):
            return self._tenant_not_found(request)
        return JSONResponse(self._ctx.issuer.jwks())

    async def instance_discovery(self, request: Request) -> Response:
        host = request.url.netloc
        return JSONResponse(
            {
                "tenant_discovery_endpoint": (
                    f"{self._base(request)}/{self._ctx.tenant.tenant_id}"
                    "/v2.0/.well-known/openid-configuration"
                ),
                "api-version": "1.1",
                "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
            }
        )

    def _tenant_not_found(self, request: Request) -> Response:
        segment = request.path_params["tenant"]
        err = OAuthError(
            400,
            "invalid_tenant",
            90002,
            f"Tenant '{segment}' not found. Check to make sure you have the correct tenant ID and "
            "are signing into the correct cloud.",
        )
        return self._fail(request, err)

    def _fail(self, request: Request, err: OAuthError) -> Response:
        if err.error != "authorization_pending":
            self._ctx.store.count_rejection("token", f"{err.status} AADSTS{err.code}")
            logger.info("token endpoint refused %s: %s AADSTS%d", request.url.path, err.error, err.code)
        return error_response(
            err, now=self._ctx.clock.now(), correlation_id=request.headers.get("client-request-id")
        )

    # -- token endpoint ------------------------------------------------------------------------

    async def token(self, request: Request) -> Response:
        if not resolve_tenant(self._ctx.tenant, request.path_params["tenant"]):
            return self._tenant_not_found(request)
        form = parse_form(await request.body())
        try:
            grant_type = form.get("grant_type") or ""
            if not grant_type:
                raise _missing("grant_type")
            client_id = form.get("client_id", "")
            if not client_id:
                raise _missing("client_id")
            app = self._find_app(client_id)
            if grant_type == "client_credentials":
                body = self._client_credentials(request, form, app)
            elif grant_type == "refresh_token":
                body = self._refresh_token(request, form, app)
            elif grant_type == DEVICE_CODE_GRANT:
                body = self._device_code(request, form, app)
            else:
                raise OAuthError(
                    400,
                    "unsupported_grant_type",
                    70003,
                    f"The app requested an unsupported grant type '{grant_type}'.",
                )
        except OAuthError as err:
            return self._fail(request, err)
        logger.info("token issued: client %s grant %s", client_id, grant_type)
        return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _find_app(self, client_id: str) -> AppRegistration:
        app = find_app(self._ctx.tenant, client_id)
        if app is None:
            raise OAuthError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{self._ctx.tenant.name}'. This can happen if the application has not been "
                "installed by the administrator of the tenant or consented to by any user in the "
                "tenant. You may have sent your authentication request to the wrong tenant.",
            )
        return app

    def _authenticate(
        self, request: Request, form: dict[str, str], app: AppRegistration, grant_type: str
    ) -> str:
        """Check the client's credential; return ``appidacr`` ("0" public, "1" secret, "2" cert)."""
        secret = form.get("client_secret")
        assertion = form.get("client_assertion")
        if secret:
            if app.client_secret is None or not hmac.compare_digest(
                secret.encode(), app.client_secret.encode()
            ):
                raise OAuthError(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is "
                    "the client secret value, not the client secret ID, for a secret added to app "
                    f"'{app.client_id}'.",
                )
            return "1"
        if assertion:
            if form.get("client_assertion_type") != JWT_BEARER_ASSERTION:
                raise OAuthError(
                    400,
                    "invalid_request",
                    50027,
                    "JWT token is invalid or malformed: client_assertion_type must be "
                    f"'{JWT_BEARER_ASSERTION}'.",
                )
            try:
                # The client signs with its wall clock, which the sandbox's test clock offset
                # does not move: check the assertion's validity period against the wall clock.
                verify_client_assertion(assertion, app=app, tenant=self._ctx.tenant, now=time.time())
            except AssertionRejected as exc:
                raise OAuthError(401, "invalid_client", exc.code, exc.text) from exc
            return "2"
        if grant_type != "client_credentials" and app.public_client:
            return "0"
        if grant_type == "client_credentials":
            raise OAuthError(
                401,
                "invalid_client",
                7000216,
                "'client_assertion', 'client_secret' or 'request' is required for the "
                "'client_credentials' grant type.",
            )
        raise OAuthError(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        )

    def _client_credentials(
        self, request: Request, form: dict[str, str], app: AppRegistration
    ) -> dict[str, Any]:
        appidacr = self._authenticate(request, form, app, "client_credentials")
        scope = form.get("scope", "")
        if not scope.strip():
            raise _missing("scope")
        items = scope.split()
        for item in items:
            if not item.endswith("/.default"):
                raise OAuthError(
                    400,
                    "invalid_scope",
                    1002012,
                    f"The provided value for scope {item} is not valid. Client credential flows "
                    "must have a scope value with /.default suffixed to the resource identifier "
                    "(application ID URI).",
                )
        if len(items) != 1:
            raise OAuthError(
                400,
                "invalid_scope",
                70011,
                f"The provided value for the input parameter 'scope' is not valid. The scope "
                f"{scope} is not valid.",
            )
        audience = items[0][: -len("/.default")].rstrip("/")
        resource = resolve_resource(audience, self._ctx.tenant)
        roles = app.permissions & APP_ROLES[resource]
        lifetime = self._ctx.tenant.limits.token_lifetime
        token = self._ctx.issuer.issue(
            app=app, audience=audience, roles=roles, scopes=None, upn=None, appidacr=appidacr
        )
        return {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": token,
        }

    def _delegated_tokens(
        self, form: dict[str, str], app: AppRegistration, upn: str, scope: DelegatedScope
    ) -> dict[str, Any]:
        granted = scope.permissions & app.permissions
        if scope.permissions - app.permissions:
            raise OAuthError(
                400,
                "invalid_grant",
                65001,
                f"The user or administrator has not consented to use the application with ID "
                f"'{app.client_id}' named '{app.display_name or app.client_id}'. Send an "
                "interactive authorization request for this user and resource.",
            )
        mailbox = self._ctx.tenant.mailbox(upn)
        if mailbox is None:
            raise OAuthError(
                400,
                "invalid_grant",
                50034,
                f"The user account {upn} does not exist in the {self._ctx.tenant.name} directory. "
                "To sign into this application, the account must be added to the directory.",
            )
        lifetime = self._ctx.tenant.limits.token_lifetime
        now = self._ctx.clock.now()
        access = self._ctx.issuer.issue(
            app=app, audience=scope.audience, roles=None, scopes=granted, upn=mailbox.address
        )
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": " ".join(f"{scope.audience}/{p}" for p in sorted(granted)),
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": access,
        }
        if "offline_access" in scope.oidc:
            refresh = secrets.token_urlsafe(48)
            self._refresh[_digest(refresh)] = _RefreshGrant(
                client_id=app.client_id, upn=mailbox.address, issued_at=now, last_used=now
            )
            self._save_grants()
            body["refresh_token"] = refresh
        if "openid" in scope.oidc:
            body["id_token"] = self._ctx.issuer.issue_id_token(app=app, mailbox=mailbox)
        if form.get("client_info") == "1":
            info = {"uid": object_id(mailbox.address), "utid": self._ctx.tenant.tenant_id}
            raw = json.dumps(info, separators=(",", ":")).encode()
            body["client_info"] = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        return body

    def _refresh_token(self, request: Request, form: dict[str, str], app: AppRegistration) -> dict[str, Any]:
        self._authenticate(request, form, app, "refresh_token")
        token = form.get("refresh_token", "")
        if not token:
            raise _missing("refresh_token")
        scope_text = form.get("scope", "")
        if not scope_text.strip():
            raise _missing("scope")
        grant = self._refresh.get(_digest(token))
        if grant is None or grant.client_id.lower() != app.client_id.lower():
            raise OAuthError(
                400, "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid."
            )
        now = self._ctx.clock.now()
        valid_from = self._tokens_valid_from.get(grant.upn.lower())
        if valid_from is not None and grant.issued_at < valid_from:
            raise OAuthError(
                400,
                "invalid_grant",
                50173,
                "The provided grant has expired due to it being revoked, a fresh auth token is "
                "needed. The user might have changed or reset their password. The grant was issued "
                f"on '{entra_timestamp(grant.issued_at)}' and the TokensValidFrom date (before which tokens "
                f"are not valid) for this user is '{entra_timestamp(valid_from)}'.",
            )
        if now - grant.last_used > REFRESH_TOKEN_INACTIVITY:
            raise OAuthError(
                400,
                "invalid_grant",
                700082,
                f"The refresh token has expired due to inactivity. The token was issued on "
                f"{entra_timestamp(grant.issued_at)} and was inactive for 90.00:00:00.",
            )
        self._refresh[_digest(token)] = replace(grant, last_used=now)
        self._save_grants()
        scope = parse_delegated_scope(self._ctx.tenant, scope_text)
        return self._delegated_tokens(form, app, grant.upn, scope)

    # -- device code flow (RFC 8628) -----------------------------------------------------------

    async def devicecode(self, request: Request) -> Response:
        if not resolve_tenant(self._ctx.tenant, request.path_params["tenant"]):
            return self._tenant_not_found(request)
        form = parse_form(await request.body())
        try:
            client_id = form.get("client_id", "")
            if not client_id:
                raise _missing("client_id")
            app = self._find_app(client_id)
            scope = form.get("scope", "")
            if not scope.strip():
                raise _missing("scope")
            parse_delegated_scope(self._ctx.tenant, scope)
        except OAuthError as err:
            return self._fail(request, err)
        user_code = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(9))
        device_code = secrets.token_urlsafe(48)
        self._devices[device_code] = _DeviceGrant(
            device_code=device_code,
            user_code=user_code,
            client_id=app.client_id,
            scope=scope,
            expires_at=self._ctx.clock.now() + self._device_lifetime,
        )
        uri = f"{self._base(request)}/devicelogin"
        return JSONResponse(
            {
                "user_code": user_code,
                "device_code": device_code,
                "verification_uri": uri,
                "expires_in": self._device_lifetime,
                "interval": self._interval,
                "message": (
                    f"To sign in, use a web browser to open the page {uri} and enter the code "
                    f"{user_code} to authenticate."
                ),
            }
        )

    def approve_device_code(self, *, user_code: str, address: str, password: str) -> str:
        """Simulate the user signing in on the verification page; return the mailbox address."""
        wanted = user_code.strip().upper()
        grant = next((g for g in self._devices.values() if g.user_code == wanted), None)
        if grant is None or grant.expires_at < self._ctx.clock.now():
            raise DeviceCodeRefused("unknown or expired user code")
        mailbox = self._ctx.tenant.mailbox(address)
        if (
            mailbox is None
            or mailbox.password is None
            or not hmac.compare_digest(mailbox.password.encode(), password.encode())
        ):
            raise DeviceCodeRefused(
                "AADSTS50126: Error validating credentials due to invalid username or password."
            )
        self._devices[grant.device_code] = replace(grant, upn=mailbox.address)
        logger.info("device code approved for %s (client %s)", mailbox.address, grant.client_id)
        return mailbox.address

    def revoke_sessions(self, address: str) -> None:
        """Like Revoke-MgUserSignInSession: refresh tokens issued before now stop working."""
        self._tokens_valid_from[address.lower()] = self._ctx.clock.now()
        self._save_grants()

    def _device_code(self, request: Request, form: dict[str, str], app: AppRegistration) -> dict[str, Any]:
        code = form.get("device_code", "")
        if not code:
            raise _missing("device_code")
        grant = self._devices.get(code)
        if grant is None or grant.client_id.lower() != app.client_id.lower():
            raise OAuthError(
                400, "invalid_grant", 70000, "The provided value for the 'device_code' is not valid."
            )
        self._authenticate(request, form, app, DEVICE_CODE_GRANT)
        if grant.redeemed:
            raise OAuthError(
                400,
                "invalid_grant",
                54005,
                "OAuth2 Authorization code was already redeemed, please retry with a new valid "
                "code or use an existing refresh token.",
            )
        if self._ctx.clock.now() > grant.expires_at:
            raise OAuthError(400, "expired_token", 70019, "Verification code expired.")
        if grant.upn is None:
            raise OAuthError(
                400,
                "authorization_pending",
                70016,
                "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
            )
        scope = parse_delegated_scope(self._ctx.tenant, grant.scope)
        body = self._delegated_tokens(form, app, grant.upn, scope)
        self._devices[code] = replace(grant, redeemed=True)
        return body


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_form(body: bytes) -> dict[str, str]:
    """``application/x-www-form-urlencoded`` body; the first value of each key."""
    parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in parsed.items() if v}
