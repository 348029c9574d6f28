"""The token endpoint's refusals (raw httpx, as Entra answers them) and TokenIssuer's checks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest

from relay365.sandbox.clock import Clock
from relay365.sandbox.tokens import (
    AccessClaims,
    InvalidToken,
    TokenIssuer,
    has_smtp_permission,
    may_use_mailbox,
)
from tests.sandbox.http_fixtures import (
    ALICE,
    ALICE_PASSWORD,
    APP_KEY_PEM,
    CERT_APP,
    PUBLIC_APP,
    SCANNER,
    SECRET_APP,
    TENANT_ID,
    HttpSandbox,
    http_sandbox,
    make_tenant,
)

__all__ = ["http_sandbox"]

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@pytest.fixture
def client(http_sandbox: HttpSandbox) -> Iterator[httpx.Client]:
    with httpx.Client(verify=http_sandbox.ssl_context(), timeout=20) as made:
        yield made


def post_token(sandbox: HttpSandbox, client: httpx.Client, **data: str) -> httpx.Response:
    return client.post(f"{sandbox.authority}/oauth2/v2.0/token", data=data)


def assert_entra_error(reply: httpx.Response, status: int, error: str, code: int) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    body: dict[str, Any] = reply.json()
    assert body["error"] == error
    assert body["error_codes"] == [code]
    assert body["error_description"].startswith(f"AADSTS{code}: ")
    assert "\r\nTrace ID: " in body["error_description"]
    assert set(body) >= {"timestamp", "trace_id", "correlation_id", "error_uri"}
    return body


def test_missing_grant_type(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    reply = post_token(http_sandbox, client, client_id=SECRET_APP)
    assert_entra_error(reply, 400, "invalid_request", 900144)


def test_unsupported_grant_type(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    reply = post_token(http_sandbox, client, grant_type="password", client_id=SECRET_APP)
    assert_entra_error(reply, 400, "unsupported_grant_type", 70003)


def test_client_credentials_without_credential(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    reply = post_token(
        http_sandbox,
        client,
        grant_type="client_credentials",
        client_id=PUBLIC_APP,
        scope="https://graph.microsoft.com/.default",
    )
    assert_entra_error(reply, 401, "invalid_client", 7000216)


def test_correlation_id_is_echoed(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    correlation = str(uuid.uuid4())
    reply = client.post(
        f"{http_sandbox.authority}/oauth2/v2.0/token",
        data={"grant_type": "client_credentials", "client_id": SECRET_APP},
        headers={"client-request-id": correlation},
    )
    body = assert_entra_error(reply, 401, "invalid_client", 7000216)
    assert body["correlation_id"] == correlation


def assertion(sandbox: HttpSandbox, **overrides: Any) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from tests.sandbox.http_fixtures import APP_CERT_PEM

    cert = x509.load_pem_x509_certificate(APP_CERT_PEM.encode())
    import base64

    x5t = base64.urlsafe_b64encode(cert.fingerprint(hashes.SHA1())).decode().rstrip("=")
    now = int(time.time())
    claims = {
        "aud": f"{sandbox.authority}/oauth2/v2.0/token",
        "iss": CERT_APP,
        "sub": CERT_APP,
        "jti": str(uuid.uuid4()),
        "nbf": now,
        "exp": now + 600,
    }
    claims.update(overrides)
    return jwt.encode(claims, APP_KEY_PEM, algorithm="RS256", headers={"x5t": x5t})


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({}, 0),
        ({"exp": int(time.time()) - 3600, "nbf": int(time.time()) - 7200}, 700024),
        ({"iss": SECRET_APP}, 700021),
        ({"aud": "https://127.0.0.1/another-tenant/oauth2/v2.0/token"}, 700027),
    ],
)
def test_client_assertion_checks(
    http_sandbox: HttpSandbox, client: httpx.Client, overrides: dict[str, Any], code: int
) -> None:
    reply = post_token(
        http_sandbox,
        client,
        grant_type="client_credentials",
        client_id=CERT_APP,
        client_assertion_type=ASSERTION_TYPE,
        client_assertion=assertion(http_sandbox, **overrides),
        scope="https://outlook.office365.com/.default",
    )
    if code == 0:
        assert reply.status_code == 200, reply.text
        assert reply.json()["expires_in"] == 3600
    else:
        assert_entra_error(reply, 401, "invalid_client", code)


def start_device_flow(sandbox: HttpSandbox, client: httpx.Client, scope: str) -> dict[str, Any]:
    flow = client.post(
        f"{sandbox.authority}/oauth2/v2.0/devicecode", data={"client_id": PUBLIC_APP, "scope": scope}
    )
    assert flow.status_code == 200, flow.text
    return dict(flow.json())


def test_device_code_consent_and_reuse(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    # Mail.ReadWrite exists on Graph but was never granted to the public app: consent_required.
    flow = start_device_flow(http_sandbox, client, "https://graph.microsoft.com/Mail.ReadWrite")
    page = client.post(
        f"{http_sandbox.base_url}/devicelogin",
        data={"user_code": flow["user_code"], "address": ALICE, "password": ALICE_PASSWORD},
    )
    assert f"Signed in as {ALICE}" in page.text
    reply = post_token(
        http_sandbox, client, grant_type=DEVICE_GRANT, client_id=PUBLIC_APP, device_code=flow["device_code"]
    )
    assert_entra_error(reply, 400, "invalid_grant", 65001)

    flow = start_device_flow(http_sandbox, client, "https://outlook.office.com/SMTP.Send")
    approved = client.post(
        f"{http_sandbox.base_url}/_sandbox/devicecode/approve",
        json={"user_code": flow["user_code"], "address": ALICE, "password": ALICE_PASSWORD},
    )
    assert approved.status_code == 200
    data = {"grant_type": DEVICE_GRANT, "client_id": PUBLIC_APP, "device_code": flow["device_code"]}
    first = post_token(http_sandbox, client, **data)
    assert first.status_code == 200
    assert "refresh_token" not in first.json()  # no offline_access asked for
    assert_entra_error(post_token(http_sandbox, client, **data), 400, "invalid_grant", 54005)


def test_more_than_one_resource(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    reply = client.post(
        f"{http_sandbox.authority}/oauth2/v2.0/devicecode",
        data={
            "client_id": PUBLIC_APP,
            "scope": "https://outlook.office.com/SMTP.Send https://graph.microsoft.com/Mail.Send",
        },
    )
    assert_entra_error(reply, 400, "invalid_scope", 28000)


def test_discovery_document(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    for segment in (TENANT_ID, "contoso.test"):
        config = client.get(f"{http_sandbox.base_url}/{segment}/v2.0/.well-known/openid-configuration").json()
        assert config["token_endpoint"] == f"{http_sandbox.authority}/oauth2/v2.0/token"
        assert config["device_authorization_endpoint"].endswith("/oauth2/v2.0/devicecode")
    keys = client.get(config["jwks_uri"]).json()["keys"]
    assert keys[0]["kty"] == "RSA"
    # A resource can verify the sandbox's tokens from the published key alone.
    token = post_token(
        http_sandbox,
        client,
        grant_type="client_credentials",
        client_id=SECRET_APP,
        client_secret="s3cr3t~value.for-tests",
        scope="https://graph.microsoft.com/.default",
    ).json()["access_token"]
    key = jwt.PyJWK(keys[0]).key
    claims = jwt.decode(token, key, algorithms=["RS256"], audience="https://graph.microsoft.com")
    assert claims["iss"] == f"https://sts.windows.net/{TENANT_ID}/"
    assert claims["tid"] == TENANT_ID
    assert claims["idtyp"] == "app"
    assert sorted(claims["roles"]) == ["Mail.ReadWrite", "Mail.Send"]


# -- TokenIssuer without HTTP ---------------------------------------------------------------------


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer(make_tenant(), Clock(), issuer_host="127.0.0.1")


def smtp_token(issuer: TokenIssuer, audience: str = "https://outlook.office365.com") -> str:
    app = make_tenant().apps[SECRET_APP]
    return issuer.issue(
        app=app, audience=audience, roles=frozenset({"SMTP.SendAsApp"}), scopes=None, upn=None
    )


def test_validate_accepts_both_exchange_audiences(issuer: TokenIssuer) -> None:
    for audience in ("https://outlook.office365.com", "https://outlook.office.com"):
        claims = issuer.validate(smtp_token(issuer, audience), audience="https://outlook.office365.com")
        assert claims.audience == audience
        assert has_smtp_permission(claims)


def test_validate_refuses_foreign_expired_and_wrong_audience(issuer: TokenIssuer) -> None:
    other = TokenIssuer(make_tenant(), Clock(), issuer_host="127.0.0.1")
    with pytest.raises(InvalidToken, match="key"):
        issuer.validate(smtp_token(other), audience="https://outlook.office365.com")
    with pytest.raises(InvalidToken, match="audience"):
        issuer.validate(smtp_token(issuer), audience="https://graph.microsoft.com")
    token = smtp_token(issuer)
    issuer._clock.advance(3600 + 301)  # lifetime plus Entra's 5 minutes of clock skew
    with pytest.raises(InvalidToken, match="expired"):
        issuer.validate(token, audience="https://outlook.office365.com")
    with pytest.raises(InvalidToken, match="well-formed"):
        issuer.validate("abc", audience="https://outlook.office365.com")


def test_mailbox_scope_rules() -> None:
    tenant = make_tenant()
    app_only = AccessClaims(
        app_id=SECRET_APP,
        tenant_id=TENANT_ID,
        audience="https://outlook.office365.com",
        roles=frozenset({"SMTP.SendAsApp"}),
        scopes=frozenset(),
        upn=None,
        expires_at=0,
    )
    assert may_use_mailbox(app_only, tenant, SCANNER)
    assert may_use_mailbox(app_only, tenant, SCANNER.upper())
    assert not may_use_mailbox(app_only, tenant, ALICE)
    assert not may_use_mailbox(app_only, tenant, "ghost@contoso.test")
    unknown_app = AccessClaims(**{**app_only.__dict__, "app_id": "nobody"})
    assert not may_use_mailbox(unknown_app, tenant, SCANNER)
    delegated = AccessClaims(
        **{**app_only.__dict__, "roles": frozenset(), "scopes": frozenset({"SMTP.Send"}), "upn": ALICE}
    )
    assert has_smtp_permission(delegated)
    assert may_use_mailbox(delegated, tenant, ALICE)
    assert not may_use_mailbox(delegated, tenant, SCANNER)
    no_role = AccessClaims(**{**app_only.__dict__, "roles": frozenset()})
    assert not has_smtp_permission(no_role)
