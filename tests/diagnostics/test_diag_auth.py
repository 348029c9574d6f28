"""doctor --config against a running sandbox tenant: network/TLS of each transport, token acquisition,
AUTH XOAUTH2 on the submission endpoint and the Graph permission probe (pass, warn, fail)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay365.diagnostics.checks import CheckResult, Status
from relay365.diagnostics.doctor import worst
from relay365.diagnostics.doctor_config import ConfigDoctorOptions, run_config_doctor
from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import AppRegistration, example_tenant

from .cfgfiles import APP_ID, APP_SECRET, SECRET_ENV, direct_send, graph, submission, write_config

READER_ID = "99999999-8888-7777-6666-555555555555"  # an app with Mail.ReadWrite but not Mail.Send


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    tenant = example_tenant()
    reader = AppRegistration(
        client_id=READER_ID, display_name="reader", client_secret=APP_SECRET,
        permissions=frozenset({"Mail.ReadWrite"}),
    )  # fmt: skip
    tenant = dataclasses.replace(tenant, apps={**tenant.apps, READER_ID: reader})
    async with Sandbox(tenant, state_dir=tmp_path / "sandbox") as sb:
        yield sb


SCANNER_DEVICE = {"name": "lan", "ip_allow": ["127.0.0.0/8"], "rewrite_sender": "scanner@contoso.test"}


async def _run(
    tmp_path: Path,
    *transports: dict[str, object],
    device: dict[str, object] = SCANNER_DEVICE,
    routes: list[dict[str, object]] | None = None,
) -> dict[str, CheckResult]:
    extra = {"route": routes} if routes else {}
    cfg = write_config(tmp_path, transport=list(transports), device=[device], **extra)
    results = await run_config_doctor(ConfigDoctorOptions(config=cfg, timeout_s=10))
    by_name = {r.name: r for r in results}
    assert len(by_name) == len(results), [r.name for r in results]
    return by_name


async def test_good_secret_passes_everything(
    tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, APP_SECRET)
    rows = await _run(tmp_path, submission(sandbox), graph(sandbox), direct_send(sandbox))
    assert worst(list(rows.values())) is Status.PASS, [
        r for r in rows.values() if r.status is not Status.PASS
    ]
    sub_port, http_port, mx_port = sandbox.submission_port, sandbox.http_port, sandbox.mx_port
    token = rows[f"[submission] Token submission ({APP_ID})"]
    assert "roles: " in token.detail and "SMTP.SendAsApp" in token.detail
    assert "https://outlook.office365.com" in token.detail
    assert rows[f"[submission] AUTH XOAUTH2 scanner@contoso.test at 127.0.0.1:{sub_port}"].detail.startswith(
        "235"
    )
    assert "Mail.Send" in rows[f"[graph] Token graph ({APP_ID})"].detail
    probe = rows["[graph] Graph Mail.Send scanner@contoso.test"]
    assert "ErrorInvalidRecipients; nothing sent" in probe.detail
    for name in (
        f"[submission] TCP 127.0.0.1:{sub_port}", f"[submission] TLS certificate 127.0.0.1:{sub_port}",
        f"[graph] TCP 127.0.0.1:{http_port}", f"[graph] TLS certificate 127.0.0.1:{http_port}",
        f"[direct] TCP 127.0.0.1:{mx_port}", f"[direct] TLS handshake 127.0.0.1:{mx_port}",
    ):  # fmt: skip
        assert rows[name].status is Status.PASS, rows[name]
    # The probe sent nothing: no message landed anywhere in the tenant.
    assert sandbox.ctx.store.list(mailbox=None, folder=None) == []


async def test_wrong_secret_fails_with_entra_error(
    tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, "not-the-secret")
    rows = await _run(tmp_path, submission(sandbox), graph(sandbox))
    for name in ("submission", "graph"):
        row = rows[f"[{name}] Token {name} ({APP_ID})"]
        assert row.status is Status.FAIL
        assert "invalid_client" in row.detail and "AADSTS7000215" in row.detail
        assert "client secret is wrong" in row.fix
    # Without a token, no AUTH / Graph probe is attempted.
    assert not any("XOAUTH2" in n or "Graph Mail.Send" in n for n in rows)


async def test_missing_secret_variable_fails(
    tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    rows = await _run(tmp_path, graph(sandbox))
    row = rows[f"[graph] Token graph ({APP_ID})"]
    assert row.status is Status.FAIL and SECRET_ENV in row.detail


async def test_mailbox_outside_app_scope_fails_auth_and_probe(
    tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, APP_SECRET)
    rows = await _run(
        tmp_path, submission(sandbox, "alice@contoso.test"), graph(sandbox, "alice@contoso.test")
    )
    auth = rows[f"[submission] AUTH XOAUTH2 alice@contoso.test at 127.0.0.1:{sandbox.submission_port}"]
    assert auth.status is Status.FAIL
    assert auth.detail.startswith("535 5.7.3") and auth.fix.startswith("5.7.3")  # explained by the catalogue
    probe = rows["[graph] Graph Mail.Send alice@contoso.test"]
    assert probe.status is Status.FAIL and probe.detail.startswith("403 ErrorAccessDenied")
    assert "RBAC" in probe.fix
    missing = (await _run(tmp_path, graph(sandbox, "nobody@contoso.test")))[
        "[graph] Graph Mail.Send nobody@contoso.test"
    ]
    assert missing.status is Status.FAIL and missing.detail.startswith("404 ErrorInvalidUser")


async def test_token_without_mail_send_warns(
    tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, APP_SECRET)
    rows = await _run(tmp_path, graph(sandbox, client_id=READER_ID))
    assert rows[f"[graph] Token graph ({READER_ID})"].status is Status.PASS
    warn = rows["[graph] Permission Mail.Send graph"]
    assert warn.status is Status.WARN and "Mail.ReadWrite" in warn.detail and "admin consent" in warn.fix
    assert rows["[graph] Graph Mail.Send scanner@contoso.test"].status is Status.FAIL


async def test_closed_endpoints_fail_network(
    tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .peers import closed_port

    monkeypatch.setenv(SECRET_ENV, APP_SECRET)
    with closed_port() as port:
        rows = await _run(tmp_path, direct_send(sandbox, port=port))
    row = rows[f"[direct] TCP 127.0.0.1:{port}"]
    assert row.status is Status.FAIL and "refused" in row.detail


async def test_basic_auth_submission_warns(tmp_path: Path, sandbox: Sandbox) -> None:
    basic = {
        "name": "basic", "type": "submission", "host": "127.0.0.1", "port": sandbox.submission_port,
        "ca_file": str(sandbox.ca_path), "mailbox": "scanner@contoso.test", "auth": "basic",
        "username": "scanner@contoso.test", "password_env": SECRET_ENV,
    }  # fmt: skip
    rows = await _run(tmp_path, basic)
    row = rows["[basic] Basic auth scanner@contoso.test"]
    assert row.status is Status.WARN and "December 2026" in row.detail and "xoauth2" in row.fix
    assert not any("Token" in n for n in rows)


async def test_doctor_predicts_send_as_refusals_and_probes_them(
    tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13 item 7: senders a device may use that the transport's mailbox cannot send as are a
    warning; with credentials the doctor asks Exchange (MAIL FROM, then RSET) and Graph (a recipient-less
    sendMail) whether the mailbox may send as each address. Nothing is sent."""
    monkeypatch.setenv(SECRET_ENV, APP_SECRET)
    device = {
        "name": "copier",
        "ip_allow": ["127.0.0.0/8"],
        "allowed_senders": ["noreply@contoso.test", "alice@contoso.test", "@fabrikam.test"],
    }
    routes = [
        {"name": "internal", "transport": "submission", "recipient_domains": ["contoso.test"]},
        {"name": "rest", "transport": "graph"},
    ]
    rows = await _run(tmp_path, submission(sandbox), graph(sandbox), device=device, routes=routes)
    for transport in ("submission", "graph"):
        warning = rows[f"Senders of copier on {transport}"]
        assert warning.status is Status.WARN
        assert warning.detail.startswith(
            "device 'copier' may send as noreply@contoso.test, alice@contoso.test, @fabrikam.test; "
            f"transport '{transport}' sends as scanner@contoso.test: Microsoft will refuse other senders"
        )
        assert (
            'rewrite_sender = "scanner@contoso.test"' in warning.fix
            and "Add-RecipientPermission" in warning.fix
        )
    # scanner has Send As on noreply (tenant), not on alice.
    granted = rows["[submission] Send As noreply@contoso.test (scanner@contoso.test)"]
    assert granted.status is Status.PASS and "nothing sent" in granted.detail
    denied = rows["[submission] Send As alice@contoso.test (scanner@contoso.test)"]
    assert denied.status is Status.FAIL and denied.detail.startswith("550 5.7.60")
    assert "Send As" in denied.fix
    assert rows["[graph] Send As noreply@contoso.test (scanner@contoso.test, Graph)"].status is Status.PASS
    graph_denied = rows["[graph] Send As alice@contoso.test (scanner@contoso.test, Graph)"]
    assert graph_denied.status is Status.FAIL and "ErrorSendAsDenied" in graph_denied.detail
    assert sandbox.ctx.store.list(mailbox=None, folder=None) == []  # the probes sent nothing
