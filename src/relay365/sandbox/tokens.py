"""Access tokens of the sandbox's Microsoft identity platform: issue, validate, publish keys.

Tokens are RS256-signed JWTs shaped like the v1.0 access tokens Entra ID issues for Exchange Online
and Microsoft Graph (https://learn.microsoft.com/entra/identity-platform/access-token-claims-reference):
``aud`` (the resource), ``iss`` ``https://sts.windows.net/<tid>/``, ``tid``, ``appid``, ``oid``, ``sub``,
``iat``/``nbf``/``exp``, ``roles`` (app-only tokens, a list) or ``scp`` (delegated tokens, space
separated), ``upn`` (delegated only), ``idtyp`` ("app" or "user"), ``ver`` "1.0".

Also here: Entra's error reply (:class:`OAuthError`, :func:`error_response`), shared by the
token endpoint and the fault injector, and client-assertion (certificate credential) checks.

The signing key is generated when the issuer is created (or kept in ``key_file``); without a key
file a restarted sandbox refuses the tokens of the previous run, as Entra does after a key rollover.

Exchange Online accepts SMTP tokens for both ``https://outlook.office365.com`` and
``https://outlook.office.com``; :data:`OUTLOOK_AUDIENCES` lists them, and :meth:`TokenIssuer.validate`
treats them as one resource.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.responses import JSONResponse

from relay365.errors import Relay365Error

if TYPE_CHECKING:
    from relay365.sandbox.clock import Clock
    from relay365.sandbox.tenant import AppRegistration, Mailbox, Tenant

logger = logging.getLogger(__name__)

OUTLOOK_RESOURCE = "https://outlook.office365.com"
OUTLOOK_AUDIENCES = frozenset({"https://outlook.office365.com", "https://outlook.office.com"})
GRAPH_RESOURCE = "https://graph.microsoft.com"

#: Application permissions (app roles) each resource defines, as the sandbox knows them.
#: ExchangeMessageTrace.Read.All is both an application and a delegated Graph permission
#: (learn.microsoft.com/graph/api/messagetracingroot-list-messagetraces, "Permissions").
APP_ROLES: Mapping[str, frozenset[str]] = {
    OUTLOOK_RESOURCE: frozenset({"SMTP.SendAsApp"}),
    GRAPH_RESOURCE: frozenset({"Mail.Send", "Mail.ReadWrite", "ExchangeMessageTrace.Read.All"}),
}
#: Delegated permissions (scopes) each resource defines.
DELEGATED_SCOPES: Mapping[str, frozenset[str]] = {
    OUTLOOK_RESOURCE: frozenset({"SMTP.Send"}),
    GRAPH_RESOURCE: frozenset({"Mail.Send", "Mail.ReadWrite", "ExchangeMessageTrace.Read.All"}),
}

# Clock skew Entra-protected resources tolerate (Microsoft.IdentityModel default: 5 minutes).
_CLOCK_SKEW = 300.0
_OBJECT_ID_NAMESPACE = uuid.UUID("6f1b4c1e-6c5e-4f7e-9d7e-73616e64626f")


class OAuthError(Relay365Error):
    """An Entra error reply: HTTP status, OAuth ``error``, AADSTS number and its text."""

    def __init__(self, status: int, error: str, code: int, text: str) -> None:
        self.status = status
        self.error = error
        self.code = code
        self.text = text
        super().__init__(f"AADSTS{code}: {text}")


def entra_timestamp(epoch: float) -> str:
    """Entra's timestamp format in error replies: ``2016-01-09 02:02:12Z``."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def error_response(err: OAuthError, *, now: float, correlation_id: str | None) -> JSONResponse:
    """The JSON body and status Entra sends for ``err``.

    https://learn.microsoft.com/entra/identity-platform/reference-error-codes#handling-error-codes-in-your-application
    """
    trace_id = str(uuid.uuid4())
    correlation = correlation_id or str(uuid.uuid4())
    stamp = entra_timestamp(now)
    body = {
        "error": err.error,
        "error_description": (
            f"AADSTS{err.code}: {err.text}\r\nTrace ID: {trace_id}\r\n"
            f"Correlation ID: {correlation}\r\nTimestamp: {stamp}"
        ),
        "error_codes": [err.code],
        "timestamp": stamp,
        "trace_id": trace_id,
        "correlation_id": correlation,
        "error_uri": f"https://login.microsoftonline.com/error?code={err.code}",
    }
    return JSONResponse(body, status_code=err.status, headers={"Cache-Control": "no-store"})


class InvalidToken(Relay365Error):
    """A bearer token the sandbox refuses; ``reason`` says why (never contains the token)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class AccessClaims:
    """What a resource learns from a valid access token."""

    app_id: str
    tenant_id: str
    audience: str
    roles: frozenset[str]
    scopes: frozenset[str]
    upn: str | None
    expires_at: float

    @property
    def app_only(self) -> bool:
        return self.upn is None


def canonical_resource(resource: str) -> str | None:
    """The resource a scope prefix or audience names, or None if the sandbox does not host it."""
    value = resource.rstrip("/").lower()
    if value in OUTLOOK_AUDIENCES:
        return OUTLOOK_RESOURCE
    if value in (GRAPH_RESOURCE, "00000003-0000-0000-c000-000000000000"):
        return GRAPH_RESOURCE
    if value == "00000002-0000-0ff1-ce00-000000000000":  # Office 365 Exchange Online app id
        return OUTLOOK_RESOURCE
    return None


def object_id(name: str) -> str:
    """A stable object id for a user or service principal (Entra uses random GUIDs)."""
    return str(uuid.uuid5(_OBJECT_ID_NAMESPACE, name.lower()))


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _load_or_create_key(key_file: Path | None) -> rsa.RSAPrivateKey:
    if key_file is not None and key_file.exists():
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if isinstance(key, rsa.RSAPrivateKey):
            return key
        logger.warning("ignoring %s: not an RSA private key", key_file)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_file is not None:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
    return key


class TokenIssuer:
    """Signs and checks the sandbox tenant's access tokens and ID tokens."""

    def __init__(
        self, tenant: Tenant, clock: Clock, *, issuer_host: str, key_file: Path | None = None
    ) -> None:
        """``key_file``: keep the signing key there (mode 0600) so tokens survive a restart;
        without it a fresh key is generated and earlier tokens stop validating."""
        self._tenant = tenant
        self._clock = clock
        self.issuer_host = issuer_host
        self.key_file = key_file
        self._key = _load_or_create_key(key_file)
        self._public_key = self._key.public_key()
        digest = hashlib.sha256(_b64url_uint(self._public_key.public_numbers().n).encode()).digest()
        self._kid = base64.urlsafe_b64encode(digest[:20]).rstrip(b"=").decode()

    @property
    def access_token_issuer(self) -> str:
        return f"https://sts.windows.net/{self._tenant.tenant_id}/"

    @property
    def id_token_issuer(self) -> str:
        return f"https://{self.issuer_host}/{self._tenant.tenant_id}/v2.0"

    def issue(
        self,
        *,
        app: AppRegistration,
        audience: str,
        roles: frozenset[str] | None,
        scopes: frozenset[str] | None,
        upn: str | None,
        lifetime: int | None = None,
        appidacr: str = "1",
    ) -> str:
        """An access token for ``audience``: app-only when ``upn`` is None, else delegated."""
        now = int(self._clock.now())
        ttl = self._tenant.limits.token_lifetime if lifetime is None else lifetime
        claims: dict[str, Any] = {
            "aud": audience,
            "iss": self.access_token_issuer,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "app_displayname": app.display_name or app.client_id,
            "appid": app.client_id,
            "appidacr": "0" if upn is not None and app.public_client else appidacr,
            "idp": self.access_token_issuer,
            "tid": self._tenant.tenant_id,
            "uti": secrets.token_urlsafe(16),
            "ver": "1.0",
        }
        if upn is None:
            claims["idtyp"] = "app"
            claims["oid"] = claims["sub"] = object_id("app:" + app.client_id)
            if roles:
                claims["roles"] = sorted(roles)
        else:
            claims["idtyp"] = "user"
            claims["oid"] = claims["sub"] = object_id(upn)
            claims["upn"] = claims["unique_name"] = upn
            claims["scp"] = " ".join(sorted(scopes or ()))
        return self._sign(claims)

    def issue_id_token(self, *, app: AppRegistration, mailbox: Mailbox) -> str:
        """An OpenID Connect ID token (v2.0) for a signed-in mailbox, as msal caches accounts."""
        now = int(self._clock.now())
        claims = {
            "aud": app.client_id,
            "iss": self.id_token_issuer,
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "name": mailbox.display_name or mailbox.address,
            "oid": object_id(mailbox.address),
            "preferred_username": mailbox.address,
            "sub": object_id(app.client_id + mailbox.address),
            "tid": self._tenant.tenant_id,
            "ver": "2.0",
        }
        return self._sign(claims)

    def _sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(
            dict(claims), self._key, algorithm="RS256", headers={"kid": self._kid, "typ": "JWT"}
        )

    def validate(self, token: str, *, audience: str) -> AccessClaims:
        """Check signature, issuer, tenant, audience and lifetime; raise :class:`InvalidToken`."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken("token is not a well-formed JWT") from exc
        if header.get("alg") != "RS256":
            raise InvalidToken(f"unexpected signing algorithm {header.get('alg')!r}")
        if header.get("kid") != self._kid:
            raise InvalidToken("token was signed by a key this tenant does not publish")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._public_key,
                algorithms=["RS256"],
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.InvalidSignatureError as exc:
            raise InvalidToken("token signature is invalid") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken("token could not be decoded") from exc
        if claims.get("tid") != self._tenant.tenant_id or claims.get("iss") != (self.access_token_issuer):
            raise InvalidToken("token was issued for another tenant")
        wanted = canonical_resource(audience)
        aud = str(claims.get("aud", ""))
        if wanted is None or canonical_resource(aud) != wanted:
            raise InvalidToken(f"token audience {aud!r} is not {audience!r}")
        now = self._clock.now()
        exp = float(claims.get("exp", 0))
        if now > exp + _CLOCK_SKEW:
            raise InvalidToken("token has expired")
        if now + _CLOCK_SKEW < float(claims.get("nbf", 0)):
            raise InvalidToken("token is not yet valid")
        roles = claims.get("roles", [])
        scp = str(claims.get("scp", ""))
        upn = claims.get("upn")
        return AccessClaims(
            app_id=str(claims.get("appid", "")),
            tenant_id=str(claims["tid"]),
            audience=aud,
            roles=frozenset(str(r) for r in roles) if isinstance(roles, list) else frozenset(),
            scopes=frozenset(scp.split()),
            upn=str(upn) if upn is not None else None,
            expires_at=exp,
        )

    def jwks(self) -> dict[str, Any]:
        """The JSON Web Key Set a resource fetches from ``.../discovery/v2.0/keys``."""
        numbers = self._public_key.public_numbers()
        return {
            "keys": [
                {
                    "kty": "RSA",
                    "use": "sig",
                    "alg": "RS256",
                    "kid": self._kid,
                    "n": _b64url_uint(numbers.n),
                    "e": _b64url_uint(numbers.e),
                    "issuer": self.id_token_issuer,
                }
            ]
        }


def find_app(tenant: Tenant, client_id: str) -> AppRegistration | None:
    """The app registration with this client id (GUIDs compare case-insensitively)."""
    app = tenant.apps.get(client_id)
    if app is not None:
        return app
    wanted = client_id.lower()
    return next((a for a in tenant.apps.values() if a.client_id.lower() == wanted), None)


def has_smtp_permission(claims: AccessClaims) -> bool:
    """True if the token grants SMTP AUTH: app role SMTP.SendAsApp or delegated SMTP.Send."""
    if claims.audience.rstrip("/").lower() not in OUTLOOK_AUDIENCES:
        return False
    if claims.app_only:
        return "SMTP.SendAsApp" in claims.roles
    return "SMTP.Send" in claims.scopes


def may_use_mailbox(claims: AccessClaims, tenant: Tenant, mailbox: str | Mailbox) -> bool:
    """May this token act for ``mailbox``?

    App-only: the mailbox exists and the app is registered with access to it (``mailboxes`` None
    means every mailbox, like ``FullAccess`` for the service principal; a set models RBAC for
    Applications management scopes). Delegated: only the signed-in user's own mailbox.
    """
    address = mailbox if isinstance(mailbox, str) else mailbox.address
    found = tenant.mailbox(address)
    if found is None:
        return False
    if not claims.app_only:
        return claims.upn is not None and claims.upn.lower() == found.address.lower()
    app = find_app(tenant, claims.app_id)
    if app is None:
        return False
    if app.mailboxes is None:
        return True
    return found.address.lower() in {m.lower() for m in app.mailboxes}


#: OpenID Connect scopes: they ask for an ID token / refresh token, not for a resource.
OIDC_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})


@dataclass(frozen=True)
class DelegatedScope:
    """A delegated ``scope`` parameter: one resource, its permissions, the OIDC scopes asked."""

    resource: str  # canonical resource
    audience: str  # as the client named it
    permissions: frozenset[str]
    oidc: frozenset[str]


def resolve_resource(audience: str, tenant: Tenant) -> str:
    """The canonical resource an audience or scope prefix names, else Entra's invalid_resource."""
    resource = canonical_resource(audience)
    if resource is None:
        raise OAuthError(
            400,
            "invalid_resource",
            500011,
            f"The resource principal named {audience} was not found in the tenant named "
            f"{tenant.name}. This can happen if the application has not been "
            "installed by the administrator of the tenant or consented to by any user in the "
            "tenant. You might have sent your authentication request to the wrong tenant.",
        )
    return resource


def parse_delegated_scope(tenant: Tenant, scope: str) -> DelegatedScope:
    """Parse a delegated scope string into one resource and its permissions."""
    items = scope.split()
    oidc = frozenset(i for i in items if i in OIDC_SCOPES)
    found: dict[str, tuple[str, set[str]]] = {}
    for item in items:
        if item in OIDC_SCOPES:
            continue
        prefix, sep, perm = item.rpartition("/")
        audience = prefix.rstrip("/") if sep else GRAPH_RESOURCE
        resource = resolve_resource(audience, tenant)
        known = DELEGATED_SCOPES[resource]
        if perm != ".default" and perm not in known:
            raise OAuthError(
                400,
                "invalid_scope",
                70011,
                "The provided value for the input parameter 'scope' is not valid. The scope "
                f"{item} is not valid.",
            )
        entry = found.setdefault(resource, (audience, set()))
        entry[1].update(known if perm == ".default" else {perm})
    if not found:
        raise OAuthError(
            400,
            "invalid_scope",
            70011,
            f"The provided value for the input parameter 'scope' is not valid. The scope "
            f"{scope} is not valid.",
        )
    if len(found) > 1:
        raise OAuthError(
            400,
            "invalid_scope",
            28000,
            "Provided value for the input parameter scope is not valid because it contains "
            f"more than one resource. Scope {scope} is not valid.",
        )
    resource, (audience, perms) = next(iter(found.items()))
    return DelegatedScope(resource=resource, audience=audience, permissions=frozenset(perms), oidc=oidc)


def resolve_tenant(tenant: Tenant, segment: str) -> bool:
    """Does an authority path segment name this tenant (its id, name or an accepted domain)?"""
    value = segment.lower()
    names = {tenant.tenant_id.lower(), tenant.name.lower()}
    names.update(d.lower() for d in tenant.accepted_domains)
    return value in names


class AssertionRejected(Relay365Error):
    """A client assertion (certificate credential) Entra would refuse: AADSTS ``code``, ``text``."""

    def __init__(self, code: int, text: str) -> None:
        self.code = code
        self.text = text
        super().__init__(f"AADSTS{code}: {text}")


def _thumbprint(value: object) -> bytes:
    if not isinstance(value, str):
        return b""
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        return b""


def verify_client_assertion(assertion: str, *, app: AppRegistration, tenant: Tenant, now: float) -> None:
    """Check a certificate credential (RFC 7523 JWT, ``private_key_jwt``) against the app's cert.

    As Entra does: the ``x5t#S256`` (or ``x5t``) header names a certificate registered on the app,
    the signature (RS256 or PS256) verifies with its key, ``iss`` and ``sub`` are the client id,
    ``aud`` is this tenant's token endpoint, and the assertion is within its validity period.
    https://learn.microsoft.com/entra/identity-platform/certificate-credentials
    """
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.PyJWTError as exc:
        raise AssertionRejected(50027, "JWT token is invalid or malformed.") from exc
    sent = header.get("x5t#S256") or header.get("x5t") or ""
    if app.certificate_pem is None:
        raise AssertionRejected(
            700027,
            "The certificate with identifier used to sign the client assertion is not registered "
            f"on application. [Reason - The key was not found., Thumbprint of key used by client: "
            f"'{_thumbprint(sent).hex().upper()}']",
        )
    cert = x509.load_pem_x509_certificate(app.certificate_pem.encode())
    if "x5t#S256" in header:
        matches = _thumbprint(header["x5t#S256"]) == cert.fingerprint(hashes.SHA256())
    else:
        matches = _thumbprint(header.get("x5t")) == cert.fingerprint(hashes.SHA1())  # noqa: S303
    if not matches:
        raise AssertionRejected(
            700027,
            "The certificate with identifier used to sign the client assertion is not registered "
            f"on application. [Reason - The key was not found., Thumbprint of key used by client: "
            f"'{_thumbprint(sent).hex().upper()}']",
        )
    alg = header.get("alg")
    if alg not in ("RS256", "PS256"):
        raise AssertionRejected(700027, f"Client assertion uses an unsupported algorithm {alg!r}.")
    try:
        claims: dict[str, Any] = jwt.decode(
            assertion,
            cert.public_key(),  # type: ignore[arg-type]
            algorithms=[str(alg)],
            options={
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
            },
        )
    except jwt.PyJWTError as exc:
        raise AssertionRejected(700027, "Client assertion failed signature validation.") from exc
    if claims.get("iss") != app.client_id or claims.get("sub") != app.client_id:
        raise AssertionRejected(
            700021, "Client assertion application identifier doesn't match 'client_id' parameter."
        )
    audiences = claims.get("aud")
    aud_list = audiences if isinstance(audiences, list) else [audiences]
    if not any(_is_token_endpoint(tenant, a) for a in aud_list):
        raise AssertionRejected(
            700027,
            f"Client assertion failed audience validation: {audiences!r} is not the token "
            f"endpoint of tenant '{tenant.tenant_id}'.",
        )
    exp = float(claims.get("exp", 0))
    nbf = float(claims.get("nbf", claims.get("iat", 0)))
    if now > exp + _CLOCK_SKEW or now + _CLOCK_SKEW < nbf:
        raise AssertionRejected(
            700024,
            f"Client assertion is not within its valid time range. Current time: {int(now)}, "
            f"assertion valid from {int(nbf)}, expiry time of assertion {int(exp)}.",
        )


def _is_token_endpoint(tenant: Tenant, value: object) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value).path.strip("/").split("/")
    if parts[1:] not in (["oauth2", "v2.0", "token"], ["oauth2", "token"]):
        return False
    return resolve_tenant(tenant, parts[0])
