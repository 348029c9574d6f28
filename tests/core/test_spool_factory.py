"""``[spool] url``: the one place a backend is chosen (spool/factory.py), from config to a running relay
and to the ``relay365 queue`` and ``config check`` commands."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay365.errors import ConfigError
from relay365.spool.factory import locate, make_spool, open_spool, spool_exists
from relay365.spool.memory import MemorySpool
from relay365.spool.model import Envelope
from relay365.spool.postgres import PgSpool
from relay365.spool.sqlite import SqliteSpool
from tests.conftest import RecordingUpstream, make_settings, running_relay, smarthost
from tests.core.helpers import closed_port, run_cli, send_message, wait_until, write_config


def test_default_is_sqlite_in_the_spool_dir(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)  # an existing config without [spool] keeps working
    assert settings.spool.url == f"sqlite:{tmp_path / 'spool'}"
    where = locate(settings)
    assert (where.scheme, where.path) == ("sqlite", tmp_path / "spool")
    spool = make_spool(settings)
    assert isinstance(spool, SqliteSpool) and spool.directory == tmp_path / "spool"
    assert spool.min_free == settings.server.spool_min_free
    for url in ("sqlite:", ""):
        assert make_settings(tmp_path, spool={"url": url}).spool.url == f"sqlite:{tmp_path / 'spool'}"


def test_sqlite_url_paths_and_memory(tmp_path: Path) -> None:
    assert locate(make_settings(tmp_path, spool={"url": "sqlite:queue"})).path == tmp_path / "queue"
    assert locate(make_settings(tmp_path, spool={"url": "sqlite:///var/q"})).path == Path("/var/q")
    memory = make_settings(tmp_path, spool={"url": "memory:"})
    assert locate(memory).scheme == "memory" and isinstance(make_spool(memory), MemorySpool)


def test_postgresql_urls_and_unknown_schemes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(
        tmp_path,
        spool={"url": "postgresql://relay@db.lan:5432/relay365", "password_env": "PGPW", "pool_size": 4},
    )
    assert locate(settings).scheme == "postgresql" and spool_exists(settings)
    monkeypatch.setenv("PGPW", "s3cret")
    spool = make_spool(settings)
    assert isinstance(spool, PgSpool)
    assert (spool.target.url, spool.target.password, spool.target.pool_size) == (
        "postgresql://relay@db.lan:5432/relay365",
        "s3cret",
        4,
    )
    # A password in the URL is refused, and never repeated in the message.
    for url in (
        "postgresql://relay:s3cret@db.lan:5432/relay365",
        "postgres://relay@db.lan/q?password=s3cret",
    ):
        with pytest.raises(ConfigError) as e:
            make_settings(tmp_path, spool={"url": url})
        assert e.value.key == "spool.url" and "password_env or password_file" in str(e.value)
        assert "s3cret" not in str(e.value) and "***" in str(e.value)
    with pytest.raises(ConfigError, match=r"'spool.password_env'.*postgresql:// spool only"):
        make_settings(tmp_path, spool={"url": "sqlite:q", "password_env": "X"})
    with pytest.raises(ConfigError, match=r"'spool.url' has value 'mysql://x'\. Use sqlite:PATH"):
        make_settings(tmp_path, spool={"url": "mysql://x"})
    with pytest.raises(ConfigError, match=r"'spool.path'.*Unknown key"):
        make_settings(tmp_path, spool={"path": "x"})


def test_config_check_reports_an_unreachable_database(tmp_path: Path) -> None:
    url = f"postgresql://relay@127.0.0.1:{closed_port()}/relay365"
    config = write_config(tmp_path, spool={"url": url, "connect_timeout": 1})
    r = run_cli("config", "check", str(config))
    assert r.returncode != 0
    assert f"spool.url: cannot connect to {url}" in r.stderr, r.stderr


async def test_queue_commands_follow_the_url(tmp_path: Path) -> None:
    """A spool outside server.spool_dir: the server writes there and `relay365 queue` reads there."""
    elsewhere = tmp_path / "queue-elsewhere"
    config = write_config(tmp_path, spool={"url": f"sqlite:{elsewhere}"})
    r = await asyncio.to_thread(run_cli, "queue", "list", "-c", str(config))
    assert r.returncode == 2 and f"no spool at {elsewhere}" in r.stderr
    settings = make_settings(tmp_path, spool={"url": f"sqlite:{elsewhere}"})
    assert not spool_exists(settings)
    async with open_spool(settings) as spool:
        qid = await spool.enqueue(Envelope("a@contoso.com", ("b@contoso.com",)), b"Subject: x\r\n\r\nx\r\n")
    assert spool_exists(settings) and not (tmp_path / "spool" / "queue.db").exists()
    r = await asyncio.to_thread(run_cli, "queue", "list", "-c", str(config))
    assert r.returncode == 0 and qid in r.stdout


async def test_a_relay_on_the_memory_spool_delivers(tmp_path: Path, upstream: RecordingUpstream) -> None:
    settings = make_settings(
        tmp_path,
        spool={"url": "memory:"},
        listener=[{"name": "lan", "port": 0, "tls": "none"}],
        transport=[smarthost(upstream.port)],
    )
    async with running_relay(settings) as relay:
        assert isinstance(relay.spool, MemorySpool)
        qid = await asyncio.to_thread(send_message, relay.ports["lan"])
        [msg] = await upstream.wait_for(1)
        assert qid in msg.content.decode()  # the Received line names the queue id

        async def empty() -> bool:
            return await relay.spool.list() == []

        await wait_until(empty, what="the queue to drain")
    assert not (tmp_path / "spool" / "queue.db").exists()
