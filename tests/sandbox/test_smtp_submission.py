"""The SMTP AUTH submission endpoint (smtp.office365.com role) driven by aiosmtplib, smtplib and swaks."""

from __future__ import annotations

import asyncio
import base64
import re
import smtplib
import ssl
import warnings
from typing import Any

import aiosmtplib
import pytest

from relay365.sandbox.runner import Sandbox
from tests.sandbox.sandbox_helpers import (
    ALICE,
    APP,
    BOB,
    EXTERNAL,
    GRAPH_APP,
    INTERN,
    OFF,
    ON,
    PASSWORD,
    PUBLIC_APP,
    SCANNER,
    SCOPED_APP,
    SHARED,
    app_token,
    client_tls,
    in_thread,
    message,
    smtplib_session,
    swaks,
    xoauth2,
)

pytestmark = pytest.mark.timeout(60)


async def connect(sandbox: Sandbox, *, starttls: bool = True) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sandbox.submission_port, start_tls=False, timeout=10)
    await client.connect()
    await client.ehlo(hostname="scanner.lan")
    if starttls:
        await client.starttls(tls_context=client_tls(sandbox))
        await client.ehlo(hostname="scanner.lan")
    return client


async def auth(client: aiosmtplib.SMTP, user: str, token: str) -> aiosmtplib.SMTPResponse:
    return await client.execute_command(b"AUTH", b"XOAUTH2", xoauth2(user, token).encode())


async def test_banner_and_ehlo_before_and_after_starttls(sandbox: Sandbox) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sandbox.submission_port, start_tls=False, timeout=10)
    greeting = await client.connect()
    assert greeting.code == 220
    assert re.fullmatch(
        r"\S+\.outlook\.office365\.com Microsoft ESMTP MAIL Service ready at "
        r"\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d \+0000 \[[0-9A-F]{16}\]",
        greeting.message,
    ), greeting.message
    plain = await client.ehlo(hostname="scanner.lan")
    lines = plain.message.splitlines()
    assert re.fullmatch(r"\S+\.outlook\.office365\.com Hello \[127\.0\.0\.1\]", lines[0])
    assert lines[1:] == [
        "SIZE 157286400", "PIPELINING", "DSN", "ENHANCEDSTATUSCODES", "STARTTLS",
        "8BITMIME", "BINARYMIME", "CHUNKING", "SMTPUTF8",
    ]  # fmt: skip
    started = await client.starttls(tls_context=client_tls(sandbox))
    assert (started.code, started.message) == (220, "2.0.0 SMTP server ready")
    assert client.get_transport_info("ssl_object").version() in {"TLSv1.2", "TLSv1.3"}
    secured = await client.ehlo(hostname="scanner.lan")
    assert secured.message.splitlines()[1:] == [
        "SIZE 157286400", "PIPELINING", "DSN", "ENHANCEDSTATUSCODES", "AUTH LOGIN XOAUTH2",
        "8BITMIME", "BINARYMIME", "CHUNKING", "SMTPUTF8",
    ]  # fmt: skip
    await client.quit()


async def test_tls_below_1_2_is_refused(sandbox: Sandbox) -> None:
    ctx = client_tls(sandbox)
    with warnings.catch_warnings():  # a client offering only TLS 1.0/1.1, deprecated on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    client = await connect(sandbox, starttls=False)
    with pytest.raises((aiosmtplib.SMTPException, ssl.SSLError, ConnectionError)):
        await client.starttls(tls_context=ctx)
    client.close()
    assert sandbox.ctx.tls.server_context().minimum_version == ssl.TLSVersion.TLSv1_2
    async with asyncio.timeout(5):
        while sandbox.ctx.store.rejections() != {"submission tls handshake": 1}:
            await asyncio.sleep(0.01)


async def test_outlook_office_com_audience_and_bad_base64(sandbox: Sandbox) -> None:
    client = await connect(sandbox)
    garbled = await client.execute_command(b"AUTH", b"XOAUTH2", b"not base64!")
    assert (garbled.code, garbled.message) == (501, "5.5.2 Cannot Base64-decode Client responses")
    token = app_token(sandbox, audience="https://outlook.office.com")
    assert (await auth(client, SCANNER, token)).code == 235
    await client.quit()


async def test_auth_and_mail_before_tls_are_refused(sandbox: Sandbox) -> None:
    client = await connect(sandbox, starttls=False)
    response = await auth(client, SCANNER, app_token(sandbox))
    assert (response.code, response.message) == (504, "5.7.4 Unrecognized authentication type")
    mail = await client.execute_command(b"MAIL", b"FROM:<" + SCANNER.encode() + b">")
    assert mail.code == 530
    assert mail.message.startswith("5.7.57 Client not authenticated to send mail.")
    await client.quit()
    assert sandbox.ctx.store.rejections() == {"submission 504 5.7.4": 1, "submission 530 5.7.57": 1}


async def test_mail_without_auth_after_tls_is_530_5_7_57(sandbox: Sandbox) -> None:
    client = await connect(sandbox)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await client.sendmail(SCANNER, [ALICE], message(SCANNER, ALICE).as_bytes())
    assert refused.value.code == 530
    assert "5.7.57 Client not authenticated to send mail." in refused.value.message
    await client.quit()


async def test_xoauth2_app_token_sends_and_files_inbox_internet_and_sent_items(sandbox: Sandbox) -> None:
    client = await connect(sandbox)
    response = await auth(client, SCANNER, app_token(sandbox))
    assert (response.code, response.message) == (235, "2.7.0 Authentication successful")
    msg = message(SCANNER, ALICE, subject="Invoice 42")
    errors, reply = await client.sendmail(SCANNER, [ALICE, EXTERNAL], msg.as_bytes())
    assert errors == {}
    assert re.fullmatch(r"2\.0\.0 OK <\d+@test\.contoso\.test> \[Hostname=\S+\]", reply)
    await client.quit()
    store = sandbox.ctx.store
    inbox = store.list(mailbox=ALICE, folder="Inbox")
    internet = store.list(mailbox=EXTERNAL, folder="Internet")
    sent = store.list(mailbox=SCANNER, folder="SentItems")
    assert [len(inbox), len(internet), len(sent)] == [1, 1, 1]
    assert inbox[0].subject == "Invoice 42"
    assert inbox[0].endpoint == "submission"
    assert inbox[0].authenticated_as == f"{SCANNER} (XOAUTH2 app {APP})"
    assert inbox[0].rcpt_tos == (ALICE, EXTERNAL)
    assert store.content(sent[0].id) == msg.as_bytes().replace(b"\n", b"\r\n")
    assert store.rejections() == {}


async def test_aiosmtplib_oauth_token_generator_and_shared_mailbox(sandbox: Sandbox) -> None:
    token = app_token(sandbox)

    async def generator() -> str:
        return token

    errors, _ = await aiosmtplib.send(
        message(SHARED, ALICE),
        hostname="127.0.0.1",
        port=sandbox.submission_port,
        start_tls=True,
        tls_context=client_tls(sandbox),
        username=SHARED,
        oauth_token_generator=generator,
        timeout=10,
    )
    assert errors == {}
    assert len(sandbox.ctx.store.list(mailbox=SHARED, folder="SentItems")) == 1


@pytest.mark.parametrize(
    "case",
    ["expired", "graph audience", "tampered", "no smtp permission", "outside app scope", "unknown mailbox"],
)
async def test_xoauth2_refusals_are_535_5_7_3(sandbox: Sandbox, case: str) -> None:
    user = SCANNER
    kwargs: dict[str, Any] = {}
    client_id = APP
    if case == "expired":
        kwargs["lifetime"] = -600
    elif case == "graph audience":
        kwargs["audience"] = "https://graph.microsoft.com"
    elif case == "no smtp permission":
        client_id = GRAPH_APP
    elif case == "outside app scope":
        client_id, user = SCOPED_APP, ALICE
    elif case == "unknown mailbox":
        user = "nobody@contoso.test"
    token = app_token(sandbox, client_id, **kwargs)
    if case == "tampered":
        token = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    client = await connect(sandbox)
    response = await auth(client, user, token)
    assert response.code == 535
    assert re.fullmatch(r"5\.7\.3 Authentication unsuccessful \[\S+ \S+Z [0-9A-F]{16}\]", response.message)
    await client.quit()
    assert sandbox.ctx.store.rejections() == {"submission 535 5.7.3": 1}


async def test_delegated_token_may_only_use_the_signed_in_mailbox(sandbox: Sandbox) -> None:
    app = sandbox.ctx.tenant.apps[PUBLIC_APP]
    token = sandbox.ctx.issuer.issue(
        app=app,
        audience="https://outlook.office365.com",
        roles=None,
        scopes=frozenset({"SMTP.Send"}),
        upn=ALICE,
    )
    client = await connect(sandbox)
    assert (await auth(client, SCANNER, token)).code == 535
    assert (await auth(client, ALICE, token)).code == 235
    errors, _ = await client.sendmail(ALICE, [BOB], message(ALICE, BOB).as_bytes())
    assert errors == {}
    await client.quit()


async def test_smtp_auth_switches_answer_5_7_139(start_sandbox: Any) -> None:
    sandbox: Sandbox = await start_sandbox(smtp_auth_disabled=True)
    client = await connect(sandbox)
    tenant_off = await auth(client, SCANNER, app_token(sandbox))
    assert tenant_off.code == 535
    assert tenant_off.message.startswith(
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. "
        "Visit https://aka.ms/smtp_auth_disabled for more information. ["
    )
    mailbox_on = await auth(client, ON, app_token(sandbox))  # the mailbox overrides the tenant
    assert mailbox_on.code == 235
    await client.quit()
    client = await connect(sandbox)
    mailbox_off = await auth(client, OFF, app_token(sandbox))
    assert mailbox_off.code == 535
    assert mailbox_off.message.startswith(
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox."
    )
    await client.quit()
    assert sandbox.ctx.store.rejections() == {"submission 535 5.7.139": 2}


async def test_basic_auth_retired_by_default_is_550_5_7_30(sandbox: Sandbox) -> None:
    client = await in_thread(smtplib_session, sandbox.submission_port, True, client_tls(sandbox))
    try:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            await in_thread(client.login, SCANNER, PASSWORD)
        assert refused.value.smtp_code == 550
        assert (
            refused.value.smtp_error == b"5.7.30 Basic authentication is not supported for Client Submission."
        )
    finally:
        await in_thread(client.quit)


async def test_basic_auth_where_allowed(start_sandbox: Any) -> None:
    sandbox: Sandbox = await start_sandbox(basic_auth_allowed=True)
    client = await in_thread(smtplib_session, sandbox.submission_port, True, client_tls(sandbox))
    try:
        with pytest.raises(smtplib.SMTPAuthenticationError) as wrong:
            await in_thread(client.login, SCANNER, "wrong password")
        assert wrong.value.smtp_code == 535
        assert wrong.value.smtp_error.startswith(b"5.7.3 Authentication unsuccessful [")
        await in_thread(client.login, SCANNER, PASSWORD)
        refused = await in_thread(client.sendmail, SCANNER, [ALICE], message(SCANNER, ALICE).as_bytes())
        assert refused == {}
    finally:
        await in_thread(client.quit)
    (stored,) = sandbox.ctx.store.list(mailbox=ALICE)
    assert stored.authenticated_as == f"{SCANNER} (LOGIN)"


async def test_basic_auth_blocked_by_security_defaults(start_sandbox: Any) -> None:
    sandbox: Sandbox = await start_sandbox(basic_auth_allowed=True, security_defaults=True)
    client = await connect(sandbox)
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
        await client.auth_login(SCANNER, PASSWORD)
    assert refused.value.code == 535
    assert refused.value.message.startswith(
        "5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults "
        "policy. Contact your administrator."
    )
    # OAuth is not legacy authentication: Security Defaults do not block it.
    assert (await auth(client, SCANNER, app_token(sandbox))).code == 235
    await client.quit()


async def test_auth_plain_is_not_offered(start_sandbox: Any) -> None:
    sandbox: Sandbox = await start_sandbox(basic_auth_allowed=True)
    client = await connect(sandbox)
    response = await client.execute_command(b"AUTH", b"PLAIN", b"AHNjYW5uZXIAeA==")
    assert (response.code, response.message) == (504, "5.7.4 Unrecognized authentication type")
    await client.quit()


async def test_send_as_needs_a_grant(sandbox: Sandbox) -> None:
    client = await connect(sandbox)
    assert (await auth(client, SCANNER, app_token(sandbox))).code == 235
    # Send As granted: scanner may send as the shared noreply mailbox.
    errors, _ = await client.sendmail(SHARED, [ALICE], message(SHARED, ALICE).as_bytes())
    assert errors == {}
    # Not granted: the envelope sender is refused at MAIL FROM (Exchange's SMTP layer) ...
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as envelope:
        await client.sendmail(ALICE, [BOB], message(ALICE, BOB).as_bytes())
    assert (envelope.value.code, envelope.value.message) == (
        550,
        "5.7.60 SMTP; Client does not have permissions to send as this sender",
    )
    # ... and a From: header after DATA, by mailbox submission (STOREDRV).
    with pytest.raises(aiosmtplib.SMTPDataError) as header:
        await client.sendmail(SCANNER, [BOB], message(ALICE, BOB).as_bytes())
    assert header.value.code == 554
    assert header.value.message.startswith(
        f"5.2.252 SendAsDenied; {SCANNER} not allowed to send as {ALICE}; "
        "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; "
    )
    await client.quit()
    assert sandbox.ctx.store.rejections() == {"submission 550 5.7.60": 1, "submission 554 5.2.252": 1}
    assert len(sandbox.ctx.store.list(mailbox=SCANNER, folder="SentItems")) == 1


async def test_unlicensed_mailbox_cannot_send(start_sandbox: Any) -> None:
    sandbox: Sandbox = await start_sandbox(basic_auth_allowed=True)
    client = await connect(sandbox)
    await client.auth_login(INTERN, "Intern-Passw0rd!")
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await client.sendmail(
            "intern@contoso.test", [ALICE], message("intern@contoso.test", ALICE).as_bytes()
        )
    assert refused.value.code == 554
    assert refused.value.message.startswith("5.2.0 STOREDRV.Submission.Exception:InvalidLicenseException")
    await client.quit()
    assert sandbox.ctx.store.list() == []


async def test_swaks_basic_login_over_starttls(start_sandbox: Any) -> None:
    sandbox: Sandbox = await start_sandbox(basic_auth_allowed=True)
    code, transcript = await swaks(
        "--server", f"127.0.0.1:{sandbox.submission_port}",
        "--tls", "--tls-verify", "--tls-ca-path", str(sandbox.ca_path), "--tls-protocol", "tlsv1_2",
        "--auth", "LOGIN", "--auth-user", SCANNER, "--auth-password", PASSWORD,
        "--from", SCANNER, "--to", EXTERNAL, "--header", "Subject: swaks submission",
    )  # fmt: skip
    assert code == 0, transcript
    assert "<-  220 2.0.0 SMTP server ready" in transcript
    assert "<~  235 2.7.0 Authentication successful" in transcript
    (stored,) = sandbox.ctx.store.list(folder="Internet")
    assert (stored.mailbox, stored.subject) == (EXTERNAL, "swaks submission")


async def test_xoauth2_and_login_after_a_334_challenge(start_sandbox: Any) -> None:
    sandbox: Sandbox = await start_sandbox(basic_auth_allowed=True)
    client = await connect(sandbox)
    challenge = await client.execute_command(b"AUTH", b"XOAUTH2")
    assert (challenge.code, challenge.message) == (334, "")
    done = await client.execute_command(xoauth2(SCANNER, app_token(sandbox)).encode())
    assert (done.code, done.message) == (235, "2.7.0 Authentication successful")
    await client.quit()
    client = await connect(sandbox)
    username = await client.execute_command(b"AUTH", b"LOGIN")
    assert (username.code, username.message) == (334, "VXNlcm5hbWU6")  # "Username:"
    password = await client.execute_command(base64.b64encode(SCANNER.encode()))
    assert (password.code, password.message) == (334, "UGFzc3dvcmQ6")  # "Password:"
    done = await client.execute_command(base64.b64encode(PASSWORD.encode()))
    assert done.code == 235
    aborted = await client.execute_command(b"AUTH", b"LOGIN")
    assert aborted.code == 503  # already authenticated
    await client.quit()
