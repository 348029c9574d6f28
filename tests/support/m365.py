"""Relay settings that route into a running sandbox tenant: its registered app and the transport
tables for SMTP AUTH submission, Direct Send and a connector (the ``sandbox`` fixture of tests/m365
starts the tenant)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relay365.sandbox.runner import Sandbox

APP_ID = "11111111-2222-3333-4444-555555555555"
APP_SECRET = "sandbox-secret-relay365"
SECRET_ENV = "RELAY365_TEST_APP_SECRET"


def oauth(sb: Sandbox, *, client_id: str = APP_ID) -> dict[str, Any]:
    return {
        "tenant": sb.ctx.tenant.tenant_id,
        "client_id": client_id,
        "client_secret_env": SECRET_ENV,
        "authority": sb.base_url,
        "authority_ca_file": str(sb.ca_path),
    }


def submission(sb: Sandbox, **extra: Any) -> dict[str, Any]:
    return {
        "name": "submission",
        "type": "submission",
        "host": "127.0.0.1",
        "port": sb.submission_port,
        "ca_file": str(sb.ca_path),
        "mailbox": "scanner@contoso.test",
        **oauth(sb),
        **extra,
    }


def direct_send(sb: Sandbox, **extra: Any) -> dict[str, Any]:
    return {
        "name": "direct",
        "type": "direct_send",
        "host": "127.0.0.1",
        "port": sb.mx_port,
        "ca_file": str(sb.ca_path),
        "accepted_domains": ["contoso.test", "fabrikam.test"],
        **extra,
    }


def connector(sb: Sandbox, cert: tuple[Path, Path] | None = None, **extra: Any) -> dict[str, Any]:
    out = {
        "name": "connector",
        "type": "connector",
        "host": "127.0.0.1",
        "port": sb.mx_port,
        "ca_file": str(sb.ca_path),
        **extra,
    }
    if cert is not None:
        out |= {"client_cert_file": str(cert[0]), "client_key_file": str(cert[1])}
    return out
