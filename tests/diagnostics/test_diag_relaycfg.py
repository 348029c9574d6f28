"""doctor --config, relay365 itself: config validity, listener certificates, spool, queue backlog."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import trustme
from typer.testing import CliRunner

from relay365.cli import app
from relay365.diagnostics.checks import CheckResult, Status
from relay365.diagnostics.checks.relaycfg import SPOOL_FAIL_BYTES, SPOOL_WARN_BYTES
from relay365.diagnostics.dnsserver import DnsServer
from relay365.diagnostics.doctor import worst
from relay365.diagnostics.doctor_config import ConfigDoctorOptions, run_config_doctor
from relay365.replies import summary
from relay365.spool.model import Envelope, RcptState, RecipientUpdate
from relay365.spool.sqlite import SqliteSpool

from .cfgfiles import write_config
from .peers import Certs

BUSY = "451 4.7.500 Server busy. Please try again later from [203.0.113.5]. (AS761)"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(Path(tmp_path_factory.mktemp("certs")))


def _pem(leaf: trustme.LeafCert, directory: Path, name: str) -> dict[str, str]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return {"cert_file": str(cert), "key_file": str(key)}


def _by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


async def _doctor(
    config: Path, *, spool_warn_bytes: int = SPOOL_WARN_BYTES, spool_fail_bytes: int = SPOOL_FAIL_BYTES
) -> dict[str, CheckResult]:
    opts = ConfigDoctorOptions(
        config=config, timeout_s=5, spool_warn_bytes=spool_warn_bytes, spool_fail_bytes=spool_fail_bytes
    )
    return _by_name(await run_config_doctor(opts))


async def test_invalid_config_is_one_fail_row_naming_key_and_value(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, listener=[{"name": "lan", "port": 70000}])
    results = await run_config_doctor(ConfigDoctorOptions(config=cfg))
    assert len(results) == 1
    (row,) = results
    assert row.status is Status.FAIL
    assert "listener[0].port" in row.detail and "70000" in row.detail
    assert "listener[0].port" in row.fix
    missing = await run_config_doctor(ConfigDoctorOptions(config=tmp_path / "nope.toml"))
    assert missing[0].status is Status.FAIL and "Cannot read it" in missing[0].detail


async def test_healthy_relay_config_passes(tmp_path: Path, certs: Certs) -> None:
    cfg = write_config(
        tmp_path,
        listener=[{"name": "lan", "port": 0, "tls": "starttls", **_pem(certs.valid, tmp_path, "ok")}],
    )
    rows = await _doctor(cfg)
    assert worst(list(rows.values())) is Status.PASS, rows
    assert rows[f"Config {cfg}"].detail.startswith("valid: 1 listener(s)")
    assert "day(s) left" in rows["Listener certificate lan"].detail
    assert "does not exist yet" in rows[f"Spool directory {tmp_path / 'spool'}"].detail
    assert rows[f"Queue backlog {tmp_path / 'spool'}"].detail.startswith("no queue yet")


async def test_listener_certificates_expired_and_expiring(tmp_path: Path, certs: Certs) -> None:
    cfg = write_config(
        tmp_path,
        listener=[
            {"name": "old", "port": 0, "tls": "implicit", **_pem(certs.expired, tmp_path, "old")},
            {"name": "soon", "port": 1, "tls": "starttls", **_pem(certs.soon, tmp_path, "soon")},
            {"name": "none", "port": 2, "tls": "starttls"},
        ],
    )
    rows = await _doctor(cfg)
    old, soon, none = (rows[f"Listener certificate {n}"] for n in ("old", "soon", "none"))
    assert old.status is Status.FAIL and "expired on" in old.detail and "Renew" in old.fix
    assert soon.status is Status.WARN and "day(s) left" in soon.detail
    assert none.status is Status.WARN and "self-signed" in none.detail


async def test_spool_space_thresholds_and_unwritable(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    spool = tmp_path / "spool"
    ok = await _doctor(cfg)
    assert ok[f"Spool free space {spool}"].status is Status.PASS
    # Real free space of this disk against thresholds above it: warn, then fail.
    warn = await _doctor(cfg, spool_warn_bytes=1 << 60)
    assert warn[f"Spool free space {spool}"].status is Status.WARN
    assert "452 4.3.1" in warn[f"Spool free space {spool}"].fix
    fail = await _doctor(cfg, spool_warn_bytes=1 << 61, spool_fail_bytes=1 << 60)
    assert fail[f"Spool free space {spool}"].status is Status.FAIL
    # A spool directory under a regular file can never be created.
    (tmp_path / "file").write_text("x")
    bad = await _doctor(write_config(tmp_path, server={"spool_dir": str(tmp_path / "file" / "spool")}))
    row = bad[f"Spool directory {tmp_path / 'file' / 'spool'}"]
    assert row.status is Status.FAIL and "is not a directory" in row.detail


async def _spool_with_deferred(spool_dir: Path, *, age: float) -> str:
    received = time.time() - age
    spool = SqliteSpool(spool_dir, clock=lambda: received)
    await spool.open()
    try:
        qid = await spool.enqueue(
            Envelope("scanner@contoso.test", ("alice@contoso.test", "bob@fabrikam.test")),
            b"Subject: t\r\n\r\nx\r\n",
        )
        await spool.enqueue(
            Envelope("scanner@contoso.test", ("carol@contoso.test",)), b"Subject: u\r\n\r\ny\r\n"
        )
        await spool.record(
            qid,
            [
                RecipientUpdate(
                    "alice@contoso.test", RcptState.DEFERRED, BUSY, next_attempt=time.time() + 300
                ),
                RecipientUpdate("bob@fabrikam.test", RcptState.DELIVERED, "250 2.0.0 OK"),
            ],
        )
    finally:
        await spool.close()
    return qid


async def test_queue_backlog_and_oldest_deferred_explained(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    qid = await _spool_with_deferred(tmp_path / "spool", age=3 * 3600)
    rows = await _doctor(cfg)
    backlog = rows[f"Queue backlog {tmp_path / 'spool'}"]
    assert backlog.status is Status.PASS and backlog.detail.startswith("2 message(s) queued")
    oldest = rows["Oldest deferred recipient"]
    assert oldest.status is Status.WARN
    assert qid in oldest.detail and "<alice@contoso.test>" in oldest.detail and "4.7.500" in oldest.detail
    assert oldest.fix == summary(BUSY) and "Graylisting" in oldest.fix  # the catalogue's meaning and fix


async def test_deferred_past_half_the_queue_lifetime_fails(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, delivery={"queue_lifetime": 86400})
    await _spool_with_deferred(tmp_path / "spool", age=20 * 3600)
    oldest = (await _doctor(cfg))["Oldest deferred recipient"]
    assert oldest.status is Status.FAIL and "it will bounce" in oldest.detail


def test_cli_config_json(tmp_path: Path) -> None:
    good = write_config(tmp_path)
    result = CliRunner().invoke(app, ["doctor", "--config", str(good), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["status"] == "pass"  # plain loopback listener, empty spool, no transports
    assert any(c["name"] == f"Config {good}" and c["status"] == "pass" for c in data["checks"])
    bad = tmp_path / "bad.toml"
    bad.write_text('[[transport]]\nname = "x"\ntype = "carrier-pigeon"\n')
    result = CliRunner().invoke(app, ["doctor", "--config", str(bad)])
    assert result.exit_code == 1
    assert "carrier-pigeon" in result.output and "fail" in result.output


async def test_accepted_domains_dns_through_transport_nameservers(tmp_path: Path) -> None:
    from .test_diag_doctor import ZONE

    async with DnsServer(ZONE) as dns_srv:
        transport = {
            "name": "direct", "type": "direct_send", "accepted_domains": ["contoso.test", "fabrikam.test"],
            "nameservers": [dns_srv.nameserver],
        }  # fmt: skip
        cfg = write_config(tmp_path, transport=[transport])
        opts = ConfigDoctorOptions(config=cfg, timeout_s=5, check_dns=True, public_ip="203.0.113.5")
        rows = _by_name(await run_config_doctor(opts))
        skipped = _by_name(await run_config_doctor(ConfigDoctorOptions(config=cfg, timeout_s=5)))
    assert rows["MX contoso.test"].status is Status.PASS
    assert rows["MX fabrikam.test"].status is Status.FAIL
    assert rows["SPF single record fabrikam.test"].status is Status.FAIL
    assert "MX endpoint of each recipient domain" in rows["[direct] upstream"].detail
    assert not any(n.startswith(("MX ", "SPF ")) for n in skipped)
