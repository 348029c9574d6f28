"""``relay365 explain`` through the CLI."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from relay365.cli import app
from relay365.diagnostics.explain import explain


def test_explain_ndr_line_rich() -> None:
    result = CliRunner().invoke(
        app, ["explain", "Remote Server returned '550 5.7.64 TenantAttribution; Relay Access Denied'"]
    )
    assert result.exit_code == 0, result.output
    assert "5.7.64" in result.output
    assert "connector" in result.output
    assert "permanent" in result.output


def test_explain_json() -> None:
    result = CliRunner().invoke(app, ["explain", "--json", "535 5.7.3 Authentication unsuccessful"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["enhanced_code"] == "5.7.3"
    assert data["reply_code"] == 535
    assert data["transient"] is True
    assert data["entry"]["category"] == "authentication"
    assert data["entry"]["source"].startswith("https://learn.microsoft.com/")
    assert data["entry"]["protocol"] == "smtp"
    graph = json.loads(CliRunner().invoke(app, ["explain", "--json", "403 ErrorSendAsDenied: x"]).output)
    assert (graph["entry"]["protocol"], graph["entry"]["category"], graph["transient"]) == (
        "graph",
        "sender permission",
        False,
    )


def test_explain_bare_code_and_unknown() -> None:
    result = CliRunner().invoke(app, ["explain", "--json", "451 4.7.555"])
    data = json.loads(result.output)
    assert data["entry"]["code"] == "4.7.500-699"
    assert data["transient"] is True
    unknown = CliRunner().invoke(app, ["explain", "5.9.250"])
    assert unknown.exit_code == 1
    assert "not in relay365's catalogue" in unknown.output


def test_explain_api() -> None:
    e = explain("#550 5.4.1 Recipient address rejected: Access denied. AS(201806281) ##")
    assert e.entry is not None and e.entry.code == "5.4.1"
    assert e.to_dict()["entry"]["typical_reply"].startswith("550 5.4.1")
    assert not e.transient
