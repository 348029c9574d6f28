"""Predicting 5.7.60: senders a device may use that the transport's mailbox cannot send as."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from relay365.cli import app
from relay365.diagnostics.sendas import send_as_risks, sender_risk
from relay365.settings import Settings, parse_settings
from tests.support import toml_dumps

O365 = {
    "name": "o365",
    "type": "submission",
    "mailbox": "scanner@contoso.com",
    "tenant": "contoso.com",
    "client_id": "00000000-0000-0000-0000-000000000001",
}
GRAPH = {**O365, "name": "graph", "type": "graph"}
DIRECT = {"name": "direct", "type": "direct_send", "accepted_domains": ["contoso.com"]}


def config(
    devices: list[dict[str, Any]], transports: list[dict[str, Any]], routes: list[dict[str, Any]]
) -> dict[str, Any]:
    return {"device": devices, "transport": transports, "route": routes}


def settings(tmp_path: Path, data: dict[str, Any]) -> Settings:
    return parse_settings(data, base=tmp_path)


def test_device_senders_that_are_not_the_mailbox(tmp_path: Path) -> None:
    data = config(
        [
            {"name": "scanner", "ip_allow": ["10.0.0.0/24"], "allowed_senders": ["@contoso.com"]},
            {"name": "rewritten", "ip_allow": ["10.0.1.0/24"], "rewrite_sender": "scanner@contoso.com"},
            {"name": "other-mailbox", "ip_allow": ["10.0.2.0/24"], "rewrite_sender": "fax@contoso.com"},
            {"name": "exact", "ip_allow": ["10.0.3.0/24"], "allowed_senders": ["Scanner@Contoso.com"]},
        ],
        [O365, DIRECT],
        [
            {"name": "internal", "transport": "direct", "recipient_domains": ["contoso.com"]},
            {"name": "out", "transport": "o365"},
        ],
    )
    risks = {r.device: r for r in send_as_risks(settings(tmp_path, data))}
    assert set(risks) == {"scanner", "other-mailbox"}
    assert risks["scanner"].message == (
        "device 'scanner' may send as @contoso.com; transport 'o365' sends as scanner@contoso.com: "
        "Microsoft will refuse other senders with 5.7.60 unless scanner@contoso.com has Send As on them"
    )
    assert risks["scanner"].addresses == ()  # a domain pattern: nothing a probe can try
    assert risks["other-mailbox"].rewritten and risks["other-mailbox"].addresses == ("fax@contoso.com",)
    assert "is rewritten to fax@contoso.com" in risks["other-mailbox"].message


def test_routes_decide_which_transports_a_device_reaches(tmp_path: Path) -> None:
    devices = [
        {"name": "printer", "ip_allow": ["10.0.0.0/24"], "allowed_senders": ["printer@contoso.com"]},
        {"name": "app", "ip_allow": ["10.0.1.0/24"], "allowed_senders": ["*"]},
    ]
    routes = [
        # the printer's sender never matches this route's senders; the app's "*" does
        {"name": "notices", "transport": "graph", "senders": ["@notices.contoso.com"]},
        {"name": "everything", "transport": "direct", "fallbacks": ["o365"]},
        {"name": "shadowed", "transport": "graph"},  # after an unconditional route: never reached
    ]
    risks = send_as_risks(settings(tmp_path, config(devices, [O365, GRAPH, DIRECT], routes)))
    assert {(r.device, r.transport, r.senders) for r in risks} == {
        ("app", "graph", ("*",)),
        ("printer", "o365", ("printer@contoso.com",)),  # through the fallback
        ("app", "o365", ("*",)),
    }
    graph_risk = next(r for r in risks if r.transport == "graph")
    assert "403 ErrorSendAsDenied" in graph_risk.message


def test_sender_risk_for_route_test(tmp_path: Path) -> None:
    s = settings(tmp_path, config([], [O365, DIRECT], [{"name": "r", "transport": "o365"}]))
    assert sender_risk(s, transport="o365", sender="SCANNER@contoso.com") is None
    assert sender_risk(s, transport="direct", sender="anyone@contoso.com") is None
    assert "5.7.60" in (sender_risk(s, transport="o365", sender="copier@contoso.com") or "")


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    data = {"server": {"spool_dir": str(tmp_path / "spool")}, **data}
    path = tmp_path / "relay365.toml"
    path.write_text(toml_dumps(data), encoding="utf-8")
    return path


def test_config_check_and_route_test_warn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # config check runs serve's preflight, so the app's secret must be there for the check to pass
    monkeypatch.setenv("RELAY365_TEST_O365_SECRET", "not-used")
    data = config(
        [
            {"name": "scanner", "ip_allow": ["10.0.0.0/24"], "allowed_senders": ["@contoso.com"]},
            {"name": "mfp", "ip_allow": ["10.0.1.0/24"], "rewrite_sender": "scanner@contoso.com"},
        ],
        [{**O365, "client_secret_env": "RELAY365_TEST_O365_SECRET"}],
        [{"name": "all", "transport": "o365"}],
    )
    path = _write(tmp_path, data)
    checked = CliRunner().invoke(app, ["config", "check", str(path)])
    assert checked.exit_code == 0, checked.output  # valid: a warning, not an error
    assert "warning device 'scanner' may send as @contoso.com; transport 'o365' sends as" in checked.output
    assert "mfp" not in checked.output and "fix: Add rewrite_sender" in checked.output
    routed = CliRunner().invoke(
        app, ["route", "test", "--from", "copier@contoso.com", "--to", "x@example.org", "--config", str(path)]
    )
    assert routed.exit_code == 0 and "5.7.60" in routed.output
    rewritten = CliRunner().invoke(
        app,
        ["route", "test", "--from", "copier@contoso.com", "--to", "x@example.org", "--device", "mfp",
         "--config", str(path)],
    )  # fmt: skip
    assert rewritten.exit_code == 0 and "rewritten to <scanner@contoso.com>" in rewritten.output
    assert "5.7.60" not in rewritten.output


def test_the_null_sender_never_reaches_a_mailbox_transport(tmp_path: Path) -> None:
    """The router sends <> only to transports that carry it (Direct Send, connector, smart host)."""
    import dataclasses

    s = settings(
        tmp_path,
        config([{"name": "app", "ip_allow": ["10.0.0.0/24"]}], [O365], [{"name": "r", "transport": "o365"}]),
    )
    device = dataclasses.replace(s.devices[0], allowed_senders=("<>", "scanner@contoso.com"))
    assert send_as_risks(dataclasses.replace(s, devices=(device,))) == []
    assert sender_risk(s, transport="o365", sender="") is None
