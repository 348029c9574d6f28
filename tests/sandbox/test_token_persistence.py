"""With a signing-key file, tokens and refresh tokens survive a sandbox restart."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx

from tests.sandbox.http_fixtures import ALICE, ALICE_PASSWORD, PUBLIC_APP, make_tenant, serve_http

SCOPE = "https://outlook.office.com/SMTP.Send offline_access"


def test_refresh_token_and_access_token_survive_restart(tmp_path: Path) -> None:
    first_run = serve_http(make_tenant(), tmp_path, keep_signing_key=True)
    sandbox = next(first_run)
    try:
        with httpx.Client(verify=sandbox.ssl_context(), timeout=20) as client:
            flow = client.post(
                f"{sandbox.authority}/oauth2/v2.0/devicecode",
                data={"client_id": PUBLIC_APP, "scope": SCOPE},
            ).json()
            client.post(
                f"{sandbox.base_url}/_sandbox/devicecode/approve",
                json={"user_code": flow["user_code"], "address": ALICE, "password": ALICE_PASSWORD},
            ).raise_for_status()
            tokens = client.post(
                f"{sandbox.authority}/oauth2/v2.0/token",
                data={
                    "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
                    "client_id": PUBLIC_APP,
                    "device_code": flow["device_code"],
                },
            ).json()
    finally:
        first_run.close()
    grants = (tmp_path / "tls" / "refresh-grants.json").read_text()
    assert tokens["refresh_token"] not in grants  # only digests are stored
    assert ((tmp_path / "tls" / "token-signing.key").stat().st_mode & 0o777) == 0o600

    second_run = serve_http(make_tenant(), tmp_path, keep_signing_key=True)
    sandbox = next(second_run)
    try:
        claims = sandbox.ctx.issuer.validate(tokens["access_token"], audience="https://outlook.office365.com")
        assert claims.upn == ALICE
        context = ssl.create_default_context(cafile=sandbox.ca_path)
        with httpx.Client(verify=context, timeout=20) as client:
            refreshed = client.post(
                f"{sandbox.authority}/oauth2/v2.0/token",
                data={
                    "grant_type": "refresh_token",
                    "client_id": PUBLIC_APP,
                    "refresh_token": tokens["refresh_token"],
                    "scope": SCOPE,
                },
            )
        assert refreshed.status_code == 200, refreshed.text
        assert refreshed.json()["refresh_token"] != tokens["refresh_token"]
    finally:
        second_run.close()
