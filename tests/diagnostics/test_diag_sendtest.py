"""doctor --send-test: a tracked message through a running relay (relay365.service.relay.Relay
in-process) into a running sandbox tenant, found again through the sandbox's admin API."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from relay365.cli import app
from relay365.diagnostics.checks import CheckResult, Status
from relay365.diagnostics.doctor_config import ConfigDoctorOptions, run_config_doctor
from relay365.diagnostics.sendcheck import SendTestOptions
from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import example_tenant
from relay365.service.relay import Relay
from relay365.settings import load_settings

from .cfgfiles import APP_SECRET, SECRET_ENV, direct_send, graph, write_config
from .peers import LoopThread, closed_port


@pytest.fixture
async def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Sandbox]:
    monkeypatch.setenv(SECRET_ENV, APP_SECRET)
    async with Sandbox(example_tenant(), state_dir=tmp_path / "sandbox") as sb:
        yield sb


@contextlib.asynccontextmanager
async def relay_for(config: Path) -> AsyncIterator[Relay]:
    relay = Relay(load_settings(config))
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop(grace=5)


async def _send(config: Path, **kw: Any) -> list[CheckResult]:
    opts = SendTestOptions(**kw)
    results = await run_config_doctor(ConfigDoctorOptions(config=config, timeout_s=10, send_test=opts))
    return [r for r in results if r.name.startswith("Test message")]


@pytest.mark.parametrize(
    ("kind", "landed"),
    [
        ("direct_send", ["alice@contoso.test / Inbox via mx"]),
        ("graph", ["alice@contoso.test / Inbox via graph", "scanner@contoso.test / SentItems via graph"]),
    ],
)
async def test_send_test_lands_in_sandbox(
    tmp_path: Path, sandbox: Sandbox, kind: str, landed: list[str]
) -> None:
    transport = direct_send(sandbox) if kind == "direct_send" else graph(sandbox)
    config = write_config(tmp_path, transport=[transport])
    async with relay_for(config) as relay:
        sent, delivery = await _send(
            config, to="alice@contoso.test", relay_port=relay.ports["lan"],
            sandbox_url=sandbox.base_url, sandbox_ca_file=sandbox.ca_path, timeout_s=20,
        )  # fmt: skip
    assert sent.status is Status.PASS, sent
    queue_id = sent.detail.split("queue id ")[1].split()[0]
    assert len(queue_id) >= 12 and queue_id != "?"
    assert sent.fix == f"Follow it: relay365 queue show {queue_id} --config {config}"
    assert delivery.status is Status.PASS, delivery
    for where in landed:
        assert where in delivery.detail
    # The copy in the sandbox is the tracked message.
    token = sent.detail.split("Subject token ")[1].split(",")[0]
    stored = sandbox.ctx.store.list(mailbox="alice@contoso.test", folder="Inbox")
    assert [m.subject for m in stored] == [f"relay365 doctor test {token}"]


async def test_send_test_relay_not_running(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with closed_port() as port:
        (row,) = await _send(config, to="alice@contoso.test", relay_port=port)
    assert row.status is Status.FAIL and "cannot submit" in row.detail and "relay365 serve" in row.fix


async def test_send_test_login_needs_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY365_DIAG_DEVICE_PW", raising=False)
    config = write_config(tmp_path)
    (row,) = await _send(config, to="a@contoso.test", user="printer", password_env="RELAY365_DIAG_DEVICE_PW")
    assert row.status is Status.FAIL and "without a password" in row.detail


async def test_send_test_stuck_in_queue_fails_delivery(tmp_path: Path, sandbox: Sandbox) -> None:
    with closed_port() as dead:
        config = write_config(tmp_path, transport=[direct_send(sandbox, port=dead)])
        async with relay_for(config) as relay:
            sent, delivery = await _send(
                config, to="alice@contoso.test", relay_port=relay.ports["lan"],
                sandbox_url=sandbox.base_url, sandbox_ca_file=sandbox.ca_path, timeout_s=1.5,
            )  # fmt: skip
    assert sent.status is Status.PASS
    assert delivery.status is Status.FAIL and "not in the sandbox within 1.5 s" in delivery.detail


async def test_send_test_refused_recipient(tmp_path: Path, sandbox: Sandbox) -> None:
    config = write_config(
        tmp_path,
        transport=[direct_send(sandbox)],
        device=[{"name": "lan", "ip_allow": ["127.0.0.0/8"], "allowed_recipient_domains": ["contoso.test"]}],
    )
    async with relay_for(config) as relay:
        (row,) = await _send(config, to="someone@example.org", relay_port=relay.ports["lan"])
    assert row.status is Status.FAIL and row.detail.startswith("refused: 5")


def test_cli_send_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, APP_SECRET)
    with LoopThread() as lt:
        sb = Sandbox(example_tenant(), state_dir=tmp_path / "sandbox")
        lt.run(sb.__aenter__())
        try:
            config = write_config(tmp_path, transport=[direct_send(sb)])
            relay = Relay(load_settings(config))
            lt.run(relay.start())
            try:
                args = [
                    "doctor", "--config", str(config), "--send-test", "alice@contoso.test",
                    "--relay-port", str(relay.ports["lan"]), "--sandbox-url", sb.base_url,
                    "--ca-file", str(sb.ca_path), "--wait", "20", "--no-dns", "--json",
                ]  # fmt: skip
                result = CliRunner().invoke(app, args)
            finally:
                lt.run(relay.stop(grace=5))
        finally:
            lt.run(sb.close())
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    rows = {c["name"]: c for c in data["checks"]}
    assert rows["Test message to alice@contoso.test"]["status"] == "pass"
    assert "alice@contoso.test / Inbox via mx" in rows["Test message delivery"]["detail"]
