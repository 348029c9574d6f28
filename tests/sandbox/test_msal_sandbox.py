"""The real msal library gets tokens from the sandbox's identity platform over HTTPS."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import httpx
import msal
import pytest
import requests
from cryptography import x509

from relay365.sandbox.tokens import has_smtp_permission, may_use_mailbox
from tests.sandbox.http_fixtures import (
    ALICE,
    ALICE_PASSWORD,
    APP_CERT_PEM,
    APP_KEY_PEM,
    CERT_APP,
    PUBLIC_APP,
    SECRET,
    SECRET_APP,
    TENANT_ID,
    HttpSandbox,
    http_sandbox,
)

__all__ = ["http_sandbox"]

OUTLOOK_DEFAULT = ["https://outlook.office365.com/.default"]
GRAPH_DEFAULT = ["https://graph.microsoft.com/.default"]
SMTP_DELEGATED = ["https://outlook.office.com/SMTP.Send"]


class Clients:
    """msal applications for one test, configured exactly as the relay configures them.

    ``verify=`` alone is not enough: requests lets ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``
    override a session's ``verify`` (psf/requests#3829), so the relay hands msal its own session
    with ``trust_env = False`` and ``verify`` = the sandbox CA.
    """

    def __init__(self, sandbox: HttpSandbox) -> None:
        self.sandbox = sandbox
        self.apps: list[Any] = []

    def session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False
        session.verify = self.sandbox.ca_path
        return session

    def confidential(self, client_id: str, credential: Any) -> Any:
        app = msal.ConfidentialClientApplication(
            client_id,
            authority=self.sandbox.authority,
            client_credential=credential,
            instance_discovery=False,
            http_client=self.session(),
            azure_region=False,
        )
        self.apps.append(app)
        return app

    def public(self, client_id: str = PUBLIC_APP) -> Any:
        app = msal.PublicClientApplication(
            client_id,
            authority=self.sandbox.authority,
            instance_discovery=False,
            http_client=self.session(),
        )
        self.apps.append(app)
        return app

    def close(self) -> None:
        for app in self.apps:
            app.http_client.close()


@pytest.fixture
def clients(http_sandbox: HttpSandbox) -> Iterator[Clients]:
    made = Clients(http_sandbox)
    yield made
    made.close()


def approve(sandbox: HttpSandbox, user_code: str, password: str = ALICE_PASSWORD) -> httpx.Response:
    with httpx.Client(verify=sandbox.ssl_context(), timeout=10) as client:
        return client.post(
            f"{sandbox.base_url}/_sandbox/devicecode/approve",
            json={"user_code": user_code, "address": ALICE, "password": password},
        )


def test_client_secret_gets_smtp_token(http_sandbox: HttpSandbox, clients: Clients) -> None:
    app = clients.confidential(SECRET_APP, SECRET)
    result = app.acquire_token_for_client(scopes=OUTLOOK_DEFAULT)
    assert "access_token" in result, result
    assert result["token_type"] == "Bearer"
    claims = http_sandbox.ctx.issuer.validate(
        result["access_token"], audience="https://outlook.office365.com"
    )
    assert claims.app_id == SECRET_APP
    assert claims.tenant_id == TENANT_ID
    assert claims.roles == frozenset({"SMTP.SendAsApp"})
    assert claims.upn is None
    assert has_smtp_permission(claims)
    tenant = http_sandbox.ctx.tenant
    assert may_use_mailbox(claims, tenant, "scanner@contoso.test")
    assert not may_use_mailbox(claims, tenant, ALICE)  # outside the app's RBAC scope
    # A second call is served from msal's cache: same token.
    again = app.acquire_token_for_client(scopes=OUTLOOK_DEFAULT)
    assert again["access_token"] == result["access_token"]


def test_graph_token_has_graph_roles(http_sandbox: HttpSandbox, clients: Clients) -> None:
    app = clients.confidential(SECRET_APP, SECRET)
    result = app.acquire_token_for_client(scopes=GRAPH_DEFAULT)
    claims = http_sandbox.ctx.issuer.validate(result["access_token"], audience="https://graph.microsoft.com")
    assert claims.roles == frozenset({"Mail.Send", "Mail.ReadWrite"})
    assert not has_smtp_permission(claims)


@pytest.mark.parametrize("form", ["public_certificate", "thumbprint"])
def test_certificate_credential(http_sandbox: HttpSandbox, clients: Clients, form: str) -> None:
    credential: dict[str, str] = {"private_key": APP_KEY_PEM}
    if form == "public_certificate":  # msal signs PS256 with x5t#S256
        credential["public_certificate"] = APP_CERT_PEM
    else:  # RS256 with the SHA-1 thumbprint in x5t
        cert = x509.load_pem_x509_certificate(APP_CERT_PEM.encode())
        credential["thumbprint"] = hashlib.sha1(cert.public_bytes(_der())).hexdigest()
    app = clients.confidential(CERT_APP, credential)
    result = app.acquire_token_for_client(scopes=OUTLOOK_DEFAULT)
    assert "access_token" in result, result
    claims = http_sandbox.ctx.issuer.validate(
        result["access_token"], audience="https://outlook.office365.com"
    )
    assert claims.app_id == CERT_APP
    assert may_use_mailbox(claims, http_sandbox.ctx.tenant, ALICE)  # no RBAC scope: all
    # Moving the sandbox clock (rate-window tests) does not invalidate the client's assertions.
    http_sandbox.ctx.clock.advance(7200)
    later = clients.confidential(CERT_APP, credential).acquire_token_for_client(scopes=OUTLOOK_DEFAULT)
    assert "access_token" in later, later


def _der() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


def test_wrong_certificate_is_invalid_client(http_sandbox: HttpSandbox, clients: Clients) -> None:
    import trustme

    other = trustme.CA().issue_cert("someone-else.test", key_type=trustme.KeyType.RSA)
    app = clients.confidential(
        CERT_APP,
        {
            "private_key": other.private_key_pem.bytes().decode(),
            "public_certificate": other.cert_chain_pems[0].bytes().decode(),
        },
    )
    result = app.acquire_token_for_client(scopes=OUTLOOK_DEFAULT)
    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [700027]
    assert result["error_description"].startswith("AADSTS700027: The certificate with identifier")


def test_bad_secret_is_invalid_client(http_sandbox: HttpSandbox, clients: Clients) -> None:
    app = clients.confidential(SECRET_APP, "not-the-secret")
    result = app.acquire_token_for_client(scopes=OUTLOOK_DEFAULT)
    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [7000215]
    assert result["error_description"].startswith("AADSTS7000215: Invalid client secret provided.")
    assert "Trace ID: " in result["error_description"]
    assert result["correlation_id"] and result["trace_id"] and result["timestamp"]
    assert http_sandbox.ctx.store.rejections() == {"token 401 AADSTS7000215": 1}


def test_unknown_client_is_unauthorized_client(http_sandbox: HttpSandbox, clients: Clients) -> None:
    app = clients.confidential("99999999-9999-4999-8999-999999999999", SECRET)
    result = app.acquire_token_for_client(scopes=OUTLOOK_DEFAULT)
    assert result["error"] == "unauthorized_client"
    assert result["error_codes"] == [700016]


def test_scope_without_default_is_invalid_scope(http_sandbox: HttpSandbox, clients: Clients) -> None:
    app = clients.confidential(SECRET_APP, SECRET)
    result = app.acquire_token_for_client(scopes=["https://outlook.office365.com/SMTP.SendAsApp"])
    assert result["error"] == "invalid_scope"
    assert result["error_codes"] == [1002012]


def test_unknown_resource_is_invalid_resource(http_sandbox: HttpSandbox, clients: Clients) -> None:
    app = clients.confidential(SECRET_APP, SECRET)
    result = app.acquire_token_for_client(scopes=["https://example.invalid/.default"])
    assert result["error"] == "invalid_resource"
    assert result["error_codes"] == [500011]


def test_unknown_tenant_fails_discovery(http_sandbox: HttpSandbox, clients: Clients) -> None:
    session = clients.session()
    try:
        with pytest.raises(ValueError, match="Unable to get authority configuration") as info:
            msal.ConfidentialClientApplication(
                SECRET_APP,
                authority=f"{http_sandbox.base_url}/no-such-tenant.example",
                client_credential=SECRET,
                instance_discovery=False,
                http_client=session,
            )
        assert "AADSTS90002: Tenant 'no-such-tenant.example' not found" in str(info.value.__context__)
    finally:
        session.close()


def test_verify_parameter_without_ca_bundle_env(
    http_sandbox: HttpSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """msal's own ``verify=`` works once no CA-bundle variable overrides it."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    app = msal.ConfidentialClientApplication(
        SECRET_APP,
        authority=http_sandbox.authority,
        client_credential=SECRET,
        instance_discovery=False,
        verify=http_sandbox.ca_path,
    )
    try:
        assert "access_token" in app.acquire_token_for_client(scopes=GRAPH_DEFAULT)
    finally:
        app.http_client.close()


def test_device_code_then_refresh_token(http_sandbox: HttpSandbox, clients: Clients) -> None:
    app = clients.public()
    flow = app.initiate_device_flow(scopes=SMTP_DELEGATED)
    assert "user_code" in flow, flow
    assert flow["verification_uri"] == f"{http_sandbox.base_url}/devicelogin"
    # Before the user signs in, one poll says authorization_pending.
    pending = app.acquire_token_by_device_flow(flow, exit_condition=lambda flow: True)
    assert pending["error"] == "authorization_pending"
    assert pending["error_codes"] == [70016]
    assert approve(http_sandbox, flow["user_code"], password="wrong").status_code == 401
    assert approve(http_sandbox, flow["user_code"]).json() == {"approved": ALICE}
    result = app.acquire_token_by_device_flow(flow)
    assert "access_token" in result, result
    assert result["refresh_token"]
    assert result["id_token_claims"]["preferred_username"] == ALICE
    claims = http_sandbox.ctx.issuer.validate(
        result["access_token"], audience="https://outlook.office365.com"
    )
    assert claims.upn == ALICE
    assert claims.scopes == frozenset({"SMTP.Send"})
    assert has_smtp_permission(claims)
    assert may_use_mailbox(claims, http_sandbox.ctx.tenant, ALICE)
    assert not may_use_mailbox(claims, http_sandbox.ctx.tenant, "scanner@contoso.test")

    # The refresh token works (and rotates), from a fresh msal app that only has the token.
    fresh = clients.public()
    refreshed = fresh.acquire_token_by_refresh_token(result["refresh_token"], SMTP_DELEGATED)
    assert "access_token" in refreshed, refreshed
    assert refreshed["refresh_token"] != result["refresh_token"]
    # msal's cache has the account: acquire_token_silent works without the network round trip.
    accounts = app.get_accounts(username=ALICE)
    assert accounts
    silent = app.acquire_token_silent(SMTP_DELEGATED, account=accounts[0])
    assert silent and silent["access_token"] == result["access_token"]

    # Revoking the user's sessions kills the refresh tokens issued before.
    with httpx.Client(verify=http_sandbox.ssl_context(), timeout=10) as client:
        revoked = client.post(f"{http_sandbox.base_url}/_sandbox/sessions/revoke", json={"address": ALICE})
    assert revoked.status_code == 200
    http_sandbox.ctx.clock.advance(1)
    dead = clients.public().acquire_token_by_refresh_token(refreshed["refresh_token"], SMTP_DELEGATED)
    assert dead["error"] == "invalid_grant"
    assert dead["error_codes"] == [50173]


def test_unknown_refresh_token_is_invalid_grant(clients: Clients) -> None:
    result = clients.public().acquire_token_by_refresh_token("garbage", SMTP_DELEGATED)
    assert result["error"] == "invalid_grant"
    assert result["error_codes"] == [9002313]


def test_device_code_expires(http_sandbox: HttpSandbox, clients: Clients) -> None:
    app = clients.public()
    flow = app.initiate_device_flow(scopes=SMTP_DELEGATED)
    http_sandbox.ctx.clock.advance(flow["expires_in"] + 1)
    result = app.acquire_token_by_device_flow(flow, exit_condition=lambda flow: True)
    assert result["error"] == "expired_token"
    assert result["error_codes"] == [70019]


def test_device_code_unknown_scope(http_sandbox: HttpSandbox, clients: Clients) -> None:
    app = clients.public()
    flow = app.initiate_device_flow(scopes=["https://outlook.office.com/Nope.Nothing"])
    assert flow["error"] == "invalid_scope"
    assert flow["error_codes"] == [70011]


def test_device_code_needs_public_client(http_sandbox: HttpSandbox, clients: Clients) -> None:
    app = clients.public(SECRET_APP)
    flow = app.initiate_device_flow(scopes=SMTP_DELEGATED)
    assert approve(http_sandbox, flow["user_code"]).status_code == 200
    result = app.acquire_token_by_device_flow(flow, exit_condition=lambda flow: True)
    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [7000218]
