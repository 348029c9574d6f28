"""Shared fixtures: a relay built from a settings dict, and a recording upstream SMTP peer.

Everything listens on 127.0.0.1 with ports chosen by the kernel (port 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay365.service.relay import Relay
from relay365.settings import Settings, parse_settings
from tests.pgcluster import pg, pg_cluster  # noqa: F401  (fixtures: a private PostgreSQL cluster)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def server_cert(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate for 'localhost' and 127.0.0.1 signed by the test CA: (cert, key)."""
    leaf = ca.issue_cert("localhost", "127.0.0.1", "relay.test")
    d = tmp_path_factory.mktemp("cert")
    cert, key = d / "cert.pem", d / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def merge_sections(data: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    """Test config defaults with ``sections`` applied: a table is extended, anything else replaced."""
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def make_settings(tmp_path: Path, **sections: Any) -> Settings:
    """Settings from TOML-shaped dicts; the spool goes under tmp_path. Defaults: one STARTTLS listener
    on port 0 and a device for 127.0.0.0/8."""
    data: dict[str, Any] = {
        "server": {"hostname": "relay.test", "spool_dir": str(tmp_path / "spool"), "auth_failure_delay": 0.0},
        "listener": [{"name": "lan", "port": 0, "tls": "starttls"}],
        "device": [{"name": "local", "ip_allow": ["127.0.0.0/8"]}],
        "delivery": {"min_backoff": 60, "max_backoff": 600, "poll_interval": 0.2},
    }
    return parse_settings(merge_sections(data, sections), base=tmp_path)


@contextlib.asynccontextmanager
async def running_relay(settings: Settings, **kwargs: Any) -> AsyncIterator[Relay]:
    relay = Relay(settings, **kwargs)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop(grace=5)


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    peer: str
    tls: bool
    auth: Any = None
    mail_options: list[str] = field(default_factory=list)


@dataclass
class UpstreamPlan:
    """Replies to inject: stage ('mail' | 'rcpt:<addr>' | 'data') -> list of replies, used in order."""

    replies: dict[str, list[str]] = field(default_factory=dict)
    stall_after_data: float = 0.0

    def take(self, stage: str) -> str | None:
        queue = self.replies.get(stage)
        if queue:
            return queue.pop(0)
        return None


class _UpstreamHandler:
    def __init__(self, upstream: RecordingUpstream) -> None:
        self.up = upstream

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.up.plan.take("mail")
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.up.plan.take(f"rcpt:{address}") or self.up.plan.take("rcpt")
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.up.plan.stall_after_data:
            await asyncio.sleep(self.up.plan.stall_after_data)
        reply = self.up.plan.take("data")
        if reply:
            return reply
        assert isinstance(envelope.original_content, bytes)
        self.up.messages.append(
            Received(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                content=envelope.original_content,
                peer=str(session.peer[0]),
                tls=session.ssl is not None,
                auth=session.auth_data,
                mail_options=list(envelope.mail_options),
            )
        )
        self.up.arrived.set()
        return "250 2.0.0 Ok: stored"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.up.quits += 1
        return "221 2.0.0 Bye"


class _LenientSMTP(SMTP):
    """Accepts DATA lines longer than RFC 5322's 998 octets, as Exchange Online and Postfix do."""

    line_length_limit = 1 << 20


class RecordingUpstream:
    """An aiosmtpd upstream on the test's own event loop that records what it receives."""

    def __init__(
        self,
        *,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        auth: Callable[[str, str], bool] | None = None,
        smtputf8: bool = False,
    ) -> None:
        self.messages: list[Received] = []
        self._smtputf8 = smtputf8
        self.connections = 0
        self.quits = 0  # sessions the relay ended with QUIT
        self.plan = UpstreamPlan()
        self.arrived = asyncio.Event()
        self._tls = tls_context
        self._require = require_starttls
        self._auth = auth
        self._server: asyncio.Server | None = None
        self.port = 0

    def _factory(self) -> SMTP:
        self.connections += 1
        kwargs: dict[str, Any] = {}
        if self._auth is not None:
            check = self._auth

            def authenticator(
                server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
            ) -> Any:
                from aiosmtpd.smtp import AuthResult

                ok = check(auth_data.login.decode(), auth_data.password.decode())
                # handled=False: aiosmtpd then answers 535 itself (handled=True would leave it silent)
                return AuthResult(
                    success=ok, handled=False, auth_data=auth_data.login.decode() if ok else None
                )

            kwargs["authenticator"] = authenticator
        return _LenientSMTP(
            _UpstreamHandler(self),
            hostname="upstream.test",
            tls_context=self._tls,
            require_starttls=self._require,
            auth_require_tls=True,
            enable_SMTPUTF8=self._smtputf8,
            **kwargs,
        )

    async def start(self) -> RecordingUpstream:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, host="127.0.0.1", port=0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        async def until() -> None:
            while len(self.messages) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(until(), timeout)
        return self.messages


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    up = await RecordingUpstream().start()
    yield up
    await up.stop()


def smarthost(port: int, **extra: Any) -> dict[str, Any]:
    return {"name": "up", "type": "smarthost", "host": "127.0.0.1", "port": port, "tls": "none", **extra}
