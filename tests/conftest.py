"""Shared fixtures: the test CA and certificates, a recording upstream SMTP peer, a private PostgreSQL
cluster per test session (per xdist worker). The helpers behind them are in tests/support.

The suite runs in parallel (pytest-xdist, ./scripts/test). What keeps a test safe there: files only
under its own ``tmp_path`` (xdist gives each worker its own base), peers on 127.0.0.1 with ports the
kernel chooses (port 0; ``free_port`` only for peers that cannot bind 0), session fixtures that are
per worker (the PostgreSQL cluster: its own directory and port), no process-wide state left behind
(``monkeypatch`` for the environment). A test that measures real time against a bound is marked
``realtime``: ./scripts/test runs it alone after the parallel run. Tests marked ``slow`` (the ones
that take longest, measured with --durations) are collected first, so that in parallel they start at
once instead of finishing last.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from tests.support import RecordingUpstream
from tests.support.pgcluster import pg, pg_cluster  # noqa: F401  (fixtures: a private PostgreSQL cluster)


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


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    up = await RecordingUpstream().start()
    yield up
    await up.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked ``slow`` first (a stable sort: the order is otherwise kept)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
