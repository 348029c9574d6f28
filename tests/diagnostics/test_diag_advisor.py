"""The advisor's decision table: the article's comparison rows as test cases."""

from __future__ import annotations

import itertools
import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from relay365.cli import app
from relay365.diagnostics.advisor import Answers, Option, recommend
from relay365.diagnostics.advisor_output import (
    config_snippet,
    device_settings,
    dns_records,
    mx_endpoint,
    to_dict,
)
from relay365.errors import ConfigError
from relay365.settings import Settings, parse_settings

S, D, C, G = Option.SUBMISSION, Option.DIRECT_SEND, Option.CONNECTOR, Option.GRAPH
BOOLS = ("external_recipients", "tls12", "oauth", "port465_only", "smtp_auth_disabled",
         "reject_direct_send", "static_ip", "sent_items", "third_party_cloud")  # fmt: skip


def answers(**kw: object) -> Answers:
    base: dict[str, object] = {
        "external_recipients": False, "tls12": True, "oauth": True, "port465_only": False,
        "smtp_auth_disabled": False, "reject_direct_send": False, "static_ip": False,
        "sent_items": False, "third_party_cloud": False, "daily_messages": 100, "daily_recipients": 100,
    }  # fmt: skip
    base.update(kw)
    return Answers(**base)  # type: ignore[arg-type]


# (case, answers, expected option, via relay365). Rows cite the comparison table.
TABLE = [
    ("capable device, external: option 1", dict(external_recipients=True), S, False),
    ("capable device, internal: option 1 supports most scenarios", {}, S, False),
    ("no TLS 1.2, internal: option 2 (TLS optional)", dict(tls12=False), D, False),
    (
        "no TLS 1.2, external, static IP: option 3",
        dict(tls12=False, external_recipients=True, static_ip=True),
        C,
        False,
    ),
    ("no TLS 1.2, external, no static IP", dict(tls12=False, external_recipients=True), S, True),
    (
        "no TLS 1.2, external, static IP in a third-party cloud: connector says No",
        dict(tls12=False, external_recipients=True, static_ip=True, third_party_cloud=True),
        S,
        True,
    ),
    ("SMTP AUTH off, internal: option 2", dict(smtp_auth_disabled=True), D, False),
    (
        "SMTP AUTH off, external, static IP: option 3",
        dict(smtp_auth_disabled=True, external_recipients=True, static_ip=True),
        C,
        False,
    ),
    (
        "SMTP AUTH off, external, no static IP: Graph",
        dict(smtp_auth_disabled=True, external_recipients=True),
        G,
        True,
    ),
    (
        "SMTP AUTH off, RejectDirectSend, static IP: option 3",
        dict(smtp_auth_disabled=True, reject_direct_send=True, static_ip=True),
        C,
        False,
    ),
    (
        "SMTP AUTH off, RejectDirectSend, no static IP: Graph",
        dict(smtp_auth_disabled=True, reject_direct_send=True),
        G,
        True,
    ),
    ("Sent Items, capable device: option 1 saves to Sent Items", dict(sent_items=True), S, False),
    ("Sent Items, Basic-only device", dict(sent_items=True, oauth=False), S, True),
    ("Sent Items, SMTP AUTH off: only Graph saves", dict(sent_items=True, smtp_auth_disabled=True), G, True),
    (
        "Sent Items, SMTP AUTH off, static IP: connector says No",
        dict(sent_items=True, smtp_auth_disabled=True, static_ip=True, external_recipients=True),
        G,
        True,
    ),
    ("port 465 only, internal", dict(port465_only=True), S, True),
    ("port 465 only, SMTP AUTH off, internal", dict(port465_only=True, smtp_auth_disabled=True), D, True),
    (
        "port 465 only, SMTP AUTH off, external, static IP",
        dict(port465_only=True, smtp_auth_disabled=True, external_recipients=True, static_ip=True),
        C,
        True,
    ),
    ("bulk internal: Direct Send has higher limits", dict(daily_recipients=50_000), D, False),
    (
        "bulk external from a static IP: option 3",
        dict(daily_recipients=50_000, external_recipients=True, static_ip=True),
        C,
        False,
    ),
    (
        "third-party cloud, internal, no TLS 1.2: Direct Send supports third-party hosting",
        dict(third_party_cloud=True, tls12=False),
        D,
        False,
    ),
    (
        "third-party cloud, external, capable: option 1",
        dict(third_party_cloud=True, external_recipients=True),
        S,
        False,
    ),
    ("Basic-only device, internal: option 2", dict(oauth=False), D, False),
    (
        "Basic-only device, external, static IP: option 3",
        dict(oauth=False, external_recipients=True, static_ip=True),
        C,
        False,
    ),
    (
        "RejectDirectSend, internal, no TLS 1.2, no static IP",
        dict(reject_direct_send=True, tls12=False),
        S,
        True,
    ),
    (
        "third-party cloud, external, SMTP AUTH off, static IP: Graph",
        dict(third_party_cloud=True, external_recipients=True, smtp_auth_disabled=True, static_ip=True),
        G,
        True,
    ),
]


@pytest.mark.parametrize(("case", "kw", "option", "via"), TABLE, ids=[t[0] for t in TABLE])
def test_decision_table(case: str, kw: dict[str, object], option: Option, via: bool) -> None:
    rec = recommend(answers(**kw))
    assert (rec.option, rec.via_relay365) == (option, via), (case, rec.rejected)
    assert rec.reasons
    assert not any(w.startswith("No Microsoft 365 option") for w in rec.warnings)


def test_nothing_fits_says_so() -> None:
    rec = recommend(answers(daily_recipients=50_000, external_recipients=True, third_party_cloud=True))
    assert rec.via_relay365
    assert rec.warnings[0].startswith("No Microsoft 365 option meets every answer")
    assert "10,000 recipients per day" in rec.warnings[0]


def test_certificate_connector_without_static_ip() -> None:
    """Issue 13 item 9: SMTP AUTH off and no static IP still leaves a certificate-based connector
    (relay365 presents the certificate); it is offered, and chosen when Graph cannot carry the volume."""
    rec = recommend(answers(smtp_auth_disabled=True, external_recipients=True))
    assert rec.option is G and any(c.option is C and c.via_relay365 for c in rec.alternatives)
    bulk = recommend(answers(smtp_auth_disabled=True, external_recipients=True, daily_recipients=50_000))
    assert (bulk.option, bulk.via_relay365, bulk.choice.fits) == (C, True, True)
    assert "certificate-based connector" in to_dict(bulk)["recommendation"]["title"]
    assert any("TlsSenderCertificateName" in r for r in bulk.reasons)
    assert any("public CA" in w for w in bulk.warnings)
    snippet = tomllib.loads(config_snippet(bulk))
    assert snippet["transport"][0]["client_cert_file"] == "connector.pem"
    # The device alone still cannot: it would have to present the certificate itself.
    direct = next(c for c in bulk.rejected if c.option is C and not c.via_relay365)
    assert "certificate-based connector" in direct.blockers[0]


@pytest.mark.parametrize(
    "kw", [{}, {"smtp_auth_disabled": True, "external_recipients": True, "daily_recipients": 50_000}]
)
def test_printed_config_survives_a_narrow_terminal_and_write(kw: dict[str, object], tmp_path: Path) -> None:
    """At width 60 the printed relay365.toml is still valid TOML (never wrapped or boxed), and
    --write saves the same; an existing file needs --force."""
    f = tmp_path / "answers.json"
    f.write_text(json.dumps(answers(**kw).to_dict()))
    out = tmp_path / "relay365.toml"
    result = CliRunner().invoke(
        app, ["advise", "--answers", str(f), "--write", str(out)], env={"COLUMNS": "60"}, terminal_width=60
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = next(i for i, line in enumerate(lines) if "relay365.toml (save it with --write FILE)" in line)
    end = next(i for i in range(start + 1, len(lines)) if set(lines[i].strip()) == {"─"})
    printed = "\n".join(lines[start + 1 : end]) + "\n"
    assert max(len(line) for line in printed.splitlines()) > 60  # long lines stay whole
    assert tomllib.loads(printed) == tomllib.loads(out.read_text())
    assert printed == out.read_text()
    again = CliRunner().invoke(app, ["advise", "--answers", str(f), "--write", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    forced = CliRunner().invoke(
        app, ["advise", "--answers", str(f), "--write", str(out), "--force", "--json"]
    )
    assert forced.exit_code == 0


ALL = list(itertools.product((False, True), repeat=len(BOOLS)))


def _parse(snippet: str, base: Path) -> Settings:
    """The advisor's snippet, exactly as printed, through the relay's own config parser (with the
    certificate files a certificate-based connector names put next to it)."""
    for name in ("connector.pem", "connector.key"):
        (base / name).touch()
    return parse_settings(tomllib.loads(snippet), base=base)


SNIPPET_CASES = [
    ("submission", {}, S, False),
    ("direct_send", {"tls12": False}, D, False),
    ("connector", {"external_recipients": True, "tls12": False, "static_ip": True}, C, False),
    ("graph via relay", {"sent_items": True, "smtp_auth_disabled": True}, G, True),
    ("submission via relay, 465", {"port465_only": True}, S, True),
]


@pytest.mark.parametrize(("case", "kw", "option", "via"), SNIPPET_CASES, ids=[c[0] for c in SNIPPET_CASES])
def test_snippet_parses_with_relay_settings(
    case: str, kw: dict[str, object], option: Option, via: bool, tmp_path: Path
) -> None:
    rec = recommend(answers(domain="fabrikam.com", mailbox="copier@fabrikam.com", **kw))
    assert (rec.option, rec.via_relay365) == (option, via), case
    snippet = config_snippet(rec)
    assert "CHANGE" in snippet and "relay365 doctor --config" in snippet
    settings = _parse(snippet, tmp_path)
    (t,) = settings.transports
    (route,) = settings.routes
    assert (t.type, route.transport) == (option.value, t.name)
    (listener,) = settings.listeners
    assert (listener.port, listener.tls) == (
        (465, "implicit") if rec.answers.port465_only else (587, "starttls")
    )
    assert listener.legacy is not rec.answers.tls12
    assert settings.devices[0].ip_allow
    if option in (S, G):
        assert t.m365.mailbox == "copier@fabrikam.com" and t.m365.tenant == "fabrikam.com"
        assert t.m365.client_secret is not None and t.m365.client_secret.env == "RELAY365_CLIENT_SECRET"
    if option is S:
        assert (t.host, t.port, t.tls) == ("smtp.office365.com", 587, "required")
    if option is G:
        assert t.m365.save_to_sent_items is True
    if option in (D, C):
        assert (t.host, t.port) == ("fabrikam-com.mail.protection.outlook.com", 25)
        assert t.tls == ("opportunistic" if option is D else "required")
        assert t.m365.accepted_domains == ("fabrikam.com",)
    internal = option is D or not rec.answers.external_recipients
    assert route.recipient_domains == (("fabrikam.com",) if internal else ())


@pytest.mark.parametrize("volume", [100, 50_000])
def test_every_combination_respects_the_comparison_table(volume: int, tmp_path: Path) -> None:
    for combo in ALL:
        a = answers(**dict(zip(BOOLS, combo, strict=True)), daily_recipients=volume)
        rec = recommend(a)
        o, via = rec.option, rec.via_relay365
        fits = rec.choice.fits
        if fits:
            if o is D:  # Relay to internet: No; Sent Items: No; RejectDirectSend refuses it
                assert not (a.external_recipients or a.sent_items or a.reject_direct_send), a
            if o is C:  # A static IP (or relay365's certificate); third-party hosting: No; Sent Items: No
                assert (a.static_ip or via) and not a.third_party_cloud and not a.sent_items, a
            if o in (S, G):
                assert volume <= 10_000, a
            if o is S:
                assert not a.smtp_auth_disabled, a
            if a.sent_items:
                assert o in (S, G), a
        if not via:
            assert o is not G
            if o is S:  # TLS Required, port 587/25, OAuth: the device itself must do all of it
                assert a.tls12 and a.oauth and not a.port465_only, a
            if o in (D, C):
                assert not a.port465_only, a
            # Microsoft's preference order: no earlier option fits.
            order = [S, D, C]
            assert all(c.option not in order[: order.index(o)] for c in rec.alternatives), a
        else:
            assert all(not c.fits for c in rec.rejected if not c.via_relay365), a
        # Output is complete for every combination.
        snippet = tomllib.loads(config_snippet(rec))
        assert snippet["route"][0]["transport"] == o.value
        parsed = _parse(config_snippet(rec), tmp_path)
        assert parsed.transports[0].type == o.value and parsed.routes[0].transport == o.value
        settings = device_settings(rec)
        assert settings.port in (25, 465, 587)
        assert dns_records(rec)[0].value.startswith("v=spf1 ")
        json.dumps(to_dict(rec))


def test_device_settings_and_dns() -> None:
    rec = recommend(answers(tls12=False, domain="contoso.com", public_ip="203.0.113.5"))
    s = device_settings(rec)
    assert (s.server, s.port) == ("contoso-com.mail.protection.outlook.com", 25)
    assert dns_records(rec)[0].value == "v=spf1 ip4:203.0.113.5 include:spf.protection.outlook.com ~all"
    sub = device_settings(recommend(answers(mailbox="scan@contoso.com")))
    assert (sub.server, sub.port) == ("smtp.office365.com", 587)
    assert "XOAUTH2" in sub.credentials
    relay = recommend(answers(port465_only=True))
    assert device_settings(relay).port == 465
    assert tomllib.loads(config_snippet(relay))["listener"][0]["tls"] == "implicit"
    graph = tomllib.loads(config_snippet(recommend(answers(sent_items=True, smtp_auth_disabled=True))))
    assert graph["transport"][0]["save_to_sent_items"] is True
    assert mx_endpoint("Sub.Example.co.uk.") == "sub-example-co-uk.mail.protection.outlook.com"


def test_answers_validation() -> None:
    with pytest.raises(ConfigError, match="tls12"):
        Answers.from_dict({**answers().to_dict(), "tls12": "yes"})
    with pytest.raises(ConfigError, match="colour"):
        Answers.from_dict({**answers().to_dict(), "colour": "blue"})
    with pytest.raises(ConfigError, match="static_ip"):
        Answers.from_dict({k: v for k, v in answers().to_dict().items() if k != "static_ip"})
    with pytest.raises(ConfigError, match="daily_recipients"):
        Answers.from_dict({**answers().to_dict(), "daily_recipients": -1})


FLAGS = ["--internal-only", "--no-tls12", "--no-oauth", "--not-port465-only", "--smtp-auth-enabled",
         "--allow-direct-send", "--static-ip", "--no-sent-items", "--own-network",
         "--daily-messages", "20", "--daily-recipients", "40"]  # fmt: skip


def test_cli_flags_json() -> None:
    result = CliRunner().invoke(
        app, ["advise", *FLAGS, "--domain", "fabrikam.com", "--public-ip", "203.0.113.9", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["recommendation"] == {
        "transport": "direct_send",
        "via_relay365": False,
        "title": data["recommendation"]["title"],
    }
    assert data["device"]["server"] == "fabrikam-com.mail.protection.outlook.com"
    assert data["dns"][0]["value"] == "v=spf1 ip4:203.0.113.9 include:spf.protection.outlook.com ~all"
    assert tomllib.loads(data["relay365_config"])["route"][0]["transport"] == "direct_send"
    assert {r["option"] for r in data["rejected"]} == {"submission"}


def test_cli_answers_file_and_rich(tmp_path: Path) -> None:
    f = tmp_path / "answers.json"
    f.write_text(json.dumps({**answers(external_recipients=True, smtp_auth_disabled=True).to_dict()}))
    result = CliRunner().invoke(app, ["advise", "--answers", str(f)])
    assert result.exit_code == 0, result.output
    assert "Recommended: relay365 in front of Microsoft Graph" in result.output
    assert "[[route]]" in result.output
    assert 'transport = "graph"' in result.output
    f.write_text(json.dumps({"tls12": "maybe"}))
    bad = CliRunner().invoke(app, ["advise", "--answers", str(f), "--no-input"])
    assert bad.exit_code == 2


def test_cli_interactive_prompts() -> None:
    # external, tls12, oauth, port465, smtp-auth-off, reject-direct-send, static-ip, sent-items,
    # cloud, msgs, rcpts
    typed = "\n".join(["y", "y", "y", "n", "n", "n", "n", "y", "n", "10", "10"]) + "\n"
    result = CliRunner().invoke(app, ["advise", "--json"], input=typed)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{") :])
    assert data["recommendation"]["transport"] == "submission"
    assert data["answers"]["sent_items"] is True
    missing = CliRunner().invoke(app, ["advise", "--no-input", "--external"])
    assert missing.exit_code == 2


def test_reasons_cite_the_comparison_rows() -> None:
    rec = recommend(answers(external_recipients=True, tls12=False))
    why = {(c.option, c.via_relay365): c.blockers for c in rec.rejected}
    assert "Device or application server must support TLS: Required (TLS 1.2 or later)" in why[(S, False)]
    assert why[(D, False)][0].startswith("Relay to internet via Microsoft 365 or Office 365: No")
    assert why[(C, False)][0].startswith("Requires authentication: one or more static IP addresses")
    assert rec.reasons[0] == "Relay to internet via Microsoft 365 or Office 365: Yes"
    cloud = recommend(answers(external_recipients=True, tls12=False, static_ip=True, third_party_cloud=True))
    blockers = {(c.option, c.via_relay365): c.blockers for c in cloud.rejected}[(C, False)]
    assert blockers == ("Supports mail sent from applications hosted by a third party: No "
                        "(for example not directly from Microsoft Azure)",)  # fmt: skip
    sent = recommend(answers(sent_items=True, smtp_auth_disabled=True))
    assert "Saves to Sent Items folder: Yes (saveToSentItems=true)" in sent.reasons
