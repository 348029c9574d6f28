"""Fixtures for the sandbox's HTTPS endpoints: a tenant and the app served by uvicorn over TLS.

The server runs in its own thread with its own event loop, on a socket bound to 127.0.0.1:0
before the context is built (so the issuer host carries the real port). Synchronous clients
(msal, httpx.Client) and asynchronous ones (httpx.AsyncClient) can both talk to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvicorn
from starlette.applications import Starlette

from relay365.sandbox.context import SandboxContext, create_context
from relay365.sandbox.http import create_app
from relay365.sandbox.tenant import AppRegistration, Limits, Mailbox, Tenant
from relay365.sandbox.tokens import TokenIssuer

TENANT_ID = "0b6f1c2a-3d4e-4f50-8a1b-2c3d4e5f6a7b"
SECRET_APP = "aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa"  # secret; SMTP + Graph; scoped to 2 mailboxes
CERT_APP = "bbbbbbbb-2222-4222-8222-bbbbbbbbbbbb"  # certificate; SMTP + Mail.Send; all mailboxes
PUBLIC_APP = "cccccccc-3333-4333-8333-cccccccccccc"  # public client; delegated SMTP.Send, Mail.Send
WEAK_APP = "dddddddd-4444-4444-8444-dddddddddddd"  # secret; Mail.ReadWrite only
SECRET = "s3cr3t~value.for-tests"
APP_CERT = trustme.CA().issue_cert("relay365-app.contoso.test", key_type=trustme.KeyType.RSA)
APP_CERT_PEM = APP_CERT.cert_chain_pems[0].bytes().decode()
APP_KEY_PEM = APP_CERT.private_key_pem.bytes().decode()

SCANNER = "scanner@contoso.test"
ALICE = "alice@contoso.test"
BOB = "bob@contoso.test"
SHARED = "noreply@contoso.test"
INTERN = "intern@contoso.test"
ALICE_PASSWORD = "Alice-Passw0rd!"


def make_tenant(**limits: Any) -> Tenant:
    mailboxes = [
        Mailbox(address=SCANNER, display_name="Scanner", send_as=frozenset({SHARED})),
        Mailbox(address=ALICE, display_name="Alice Wilber", password=ALICE_PASSWORD),
        Mailbox(address=BOB, display_name="Bob Kelly", password="Bob-Passw0rd!"),
        Mailbox(address=SHARED, display_name="No Reply", shared=True, licensed=False),
        Mailbox(address=INTERN, licensed=False, password="x"),
    ]
    apps = [
        AppRegistration(
            client_id=SECRET_APP,
            display_name="relay365 (secret)",
            client_secret=SECRET,
            permissions=frozenset({"SMTP.SendAsApp", "Mail.Send", "Mail.ReadWrite"}),
            mailboxes=frozenset({SCANNER, SHARED}),
        ),
        AppRegistration(
            client_id=CERT_APP,
            display_name="relay365 (certificate)",
            certificate_pem=APP_CERT_PEM,
            permissions=frozenset({"SMTP.SendAsApp", "Mail.Send"}),
        ),
        AppRegistration(
            client_id=PUBLIC_APP,
            display_name="device sign-in",
            public_client=True,
            permissions=frozenset({"SMTP.Send", "Mail.Send"}),
        ),
        AppRegistration(
            client_id=WEAK_APP,
            display_name="read-write only",
            client_secret=SECRET,
            permissions=frozenset({"Mail.ReadWrite"}),
        ),
    ]
    return Tenant(
        tenant_id=TENANT_ID,
        name="contoso.test",
        accepted_domains=("contoso.test",),
        mailboxes={m.address: m for m in mailboxes},
        apps={a.client_id: a for a in apps},
        limits=dataclasses.replace(Limits(), **limits),
    )


@dataclass
class HttpSandbox:
    """A running HTTPS app: its context and the URLs/CA a client needs."""

    ctx: SandboxContext
    app: Starlette
    port: int

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def authority(self) -> str:
        return f"{self.base_url}/{self.ctx.tenant.tenant_id}"

    @property
    def graph_url(self) -> str:
        return f"{self.base_url}/v1.0"

    @property
    def ca_path(self) -> str:
        return str(self.ctx.tls.ca_pem_path)

    def ssl_context(self) -> ssl.SSLContext:
        """What httpx needs as ``verify=`` (httpx 0.28 deprecates a path string)."""
        return ssl.create_default_context(cafile=self.ca_path)

    def set_limits(self, **limits: Any) -> None:
        tenant = self.ctx.tenant
        self.ctx.tenant = dataclasses.replace(tenant, limits=dataclasses.replace(tenant.limits, **limits))


def serve_http(
    tenant: Tenant, state_dir: Path, *, keep_signing_key: bool = False, **app_kwargs: Any
) -> Iterator[HttpSandbox]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    ctx = create_context(tenant, state_dir=state_dir, issuer_host=f"127.0.0.1:{port}")
    if keep_signing_key:  # what create_context would do with TokenIssuer's key_file
        ctx.issuer = TokenIssuer(
            tenant,
            ctx.clock,
            issuer_host=f"127.0.0.1:{port}",
            key_file=state_dir / "tls" / "token-signing.key",
        )
    app = create_app(ctx, **app_kwargs)
    config = uvicorn.Config(
        app,
        ssl_certfile=str(ctx.tls.cert_path),
        ssl_keyfile=str(ctx.tls.key_path),
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=2,
        date_header=False,  # the sandbox app sends Date itself (its clock), as the runner configures it
    )
    config.load()
    config.ssl = ctx.tls.server_context()
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=lambda: asyncio.run(server.serve(sockets=[sock])), name="sandbox-http", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("sandbox HTTP server did not start")
        time.sleep(0.01)
    try:
        yield HttpSandbox(ctx=ctx, app=app, port=port)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "sandbox HTTP server did not stop"


@pytest.fixture
def http_sandbox(tmp_path: Path) -> Iterator[HttpSandbox]:
    yield from serve_http(make_tenant(), tmp_path, device_code_interval=1)
