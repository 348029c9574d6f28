"""Graph sendMail against the sandbox with httpx over HTTPS: JSON and MIME forms, and the refusals."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from email import policy
from email.parser import BytesParser
from typing import Any

import httpx
import pytest

from tests.sandbox.http_fixtures import (
    ALICE,
    ALICE_PASSWORD,
    CERT_APP,
    PUBLIC_APP,
    SCANNER,
    SECRET,
    SECRET_APP,
    SHARED,
    WEAK_APP,
    HttpSandbox,
    http_sandbox,
)

__all__ = ["http_sandbox"]

GRAPH = "https://graph.microsoft.com"


@pytest.fixture
def client(http_sandbox: HttpSandbox) -> Iterator[httpx.Client]:
    with httpx.Client(verify=http_sandbox.ssl_context(), timeout=20) as made:
        yield made


def app_token(
    sandbox: HttpSandbox,
    client: httpx.Client,
    client_id: str = SECRET_APP,
    resource: str = GRAPH,
) -> str:
    reply = client.post(
        f"{sandbox.authority}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": SECRET,
            "scope": f"{resource}/.default",
        },
    )
    assert reply.status_code == 200, reply.text
    return str(reply.json()["access_token"])


def json_message(**overrides: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "subject": "Scan 0042",
        "body": {"contentType": "Text", "content": "Your scan is attached."},
        "toRecipients": [{"emailAddress": {"address": ALICE, "name": "Alice"}}],
        "ccRecipients": [{"emailAddress": {"address": "partner@example.net"}}],
        "bccRecipients": [{"emailAddress": {"address": "audit@contoso.test"}}],
        "attachments": [
            {
                "@odata.type": "#microsoft.graph.fileAttachment",
                "name": "scan.pdf",
                "contentType": "application/pdf",
                "contentBytes": base64.b64encode(b"%PDF-1.4 fake").decode(),
            }
        ],
    }
    message.update(overrides)
    return message


def send(
    sandbox: HttpSandbox, client: httpx.Client, token: str, mailbox: str = SCANNER, **body: Any
) -> httpx.Response:
    return client.post(
        f"{sandbox.graph_url}/users/{mailbox}/sendMail",
        headers={"Authorization": f"Bearer {token}"},
        json=body,
    )


def parse(raw: bytes) -> Any:
    return BytesParser(policy=policy.default).parsebytes(raw)


def test_json_sendmail_files_every_copy(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    token = app_token(http_sandbox, client)
    reply = send(http_sandbox, client, token, message=json_message())
    assert reply.status_code == 202
    assert reply.content == b""
    store = http_sandbox.ctx.store
    inbox = store.list(mailbox=ALICE, folder="Inbox")
    audit = store.list(mailbox="audit@contoso.test", folder="Inbox")
    internet = store.list(mailbox="partner@example.net", folder="Internet")
    sent = store.list(mailbox=SCANNER, folder="SentItems")
    assert [len(inbox), len(audit), len(internet), len(sent)] == [1, 1, 1, 1]
    copy = inbox[0]
    assert copy.endpoint == "graph"
    assert copy.authenticated_as == f"{SCANNER} (Graph app {SECRET_APP})"
    assert copy.mail_from == SCANNER
    assert set(copy.rcpt_tos) == {ALICE, "partner@example.net", "audit@contoso.test"}
    received = parse(store.content(copy.id))
    assert received["Subject"] == "Scan 0042"
    assert received["Bcc"] is None  # Bcc recipients get it, nobody sees them
    assert parse(store.content(audit[0].id))["Bcc"] is None
    attachment = next(received.iter_attachments())
    assert attachment.get_filename() == "scan.pdf"
    assert attachment.get_content() == b"%PDF-1.4 fake"
    assert parse(store.content(sent[0].id))["Bcc"] == "audit@contoso.test"


def test_save_to_sent_items_false(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    token = app_token(http_sandbox, client)
    message = json_message(ccRecipients=[], bccRecipients=[], attachments=[])
    assert send(http_sandbox, client, token, message=message, saveToSentItems=False).status_code == 202
    assert http_sandbox.ctx.store.list(mailbox=SCANNER, folder="SentItems") == []
    assert len(http_sandbox.ctx.store.list(mailbox=ALICE, folder="Inbox")) == 1


def test_mime_sendmail(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    token = app_token(http_sandbox, client)
    mime = (
        f"From: Scanner <{SCANNER}>\r\nTo: {ALICE}\r\nBcc: hidden@example.org\r\n"
        "Subject: MIME form\r\nContent-Type: text/plain\r\n\r\nhello from MIME\r\n"
    ).encode()
    reply = client.post(
        f"{http_sandbox.graph_url}/users/{SCANNER}/sendMail",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain"},
        content=base64.b64encode(mime),
    )
    assert reply.status_code == 202, reply.text
    store = http_sandbox.ctx.store
    hidden = store.list(mailbox="hidden@example.org", folder="Internet")
    assert len(hidden) == 1
    content = parse(store.content(hidden[0].id))
    assert content["Bcc"] is None
    assert content["Message-ID"] and content["Date"]
    assert content.get_content().strip() == "hello from MIME"
    assert len(store.list(mailbox=SCANNER, folder="SentItems")) == 1


def test_mime_bad_base64(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    token = app_token(http_sandbox, client)
    reply = client.post(
        f"{http_sandbox.graph_url}/users/{SCANNER}/sendMail",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain"},
        content=b"From: not base64 at all!",
    )
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "ErrorMimeContentInvalidBase64String"
    assert error["message"] == "Invalid base64 string for MIME content."
    assert "request-id" in error["innerError"]


def test_send_as_needs_a_grant(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    token = app_token(http_sandbox, client)
    shared_from = {"emailAddress": {"address": SHARED}}
    ok = send(http_sandbox, client, token, message=json_message(**{"from": shared_from}))
    assert ok.status_code == 202  # scanner has Send As on noreply@
    stranger = {"emailAddress": {"address": "ceo@contoso.test"}}
    refused = send(http_sandbox, client, token, message=json_message(**{"from": stranger}))
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "ErrorSendAsDenied"


def test_missing_token_is_401(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    reply = client.post(f"{http_sandbox.graph_url}/users/{SCANNER}/sendMail", json={})
    assert reply.status_code == 401
    assert reply.json()["error"]["code"] == "InvalidAuthenticationToken"
    assert reply.json()["error"]["message"] == "Access token is empty."
    assert reply.headers["WWW-Authenticate"].startswith("Bearer ")


@pytest.mark.parametrize("problem", ["garbage", "expired", "audience", "tampered"])
def test_bad_tokens_are_401(http_sandbox: HttpSandbox, client: httpx.Client, problem: str) -> None:
    resource = "https://outlook.office365.com" if problem == "audience" else GRAPH
    token = app_token(http_sandbox, client, resource=resource)
    if problem == "garbage":
        token = "not-a-jwt"
    elif problem == "tampered":
        head, payload, signature = token.split(".")
        token = f"{head}.{payload}.{signature[::-1]}"
    elif problem == "expired":
        http_sandbox.ctx.clock.advance(3600 + 301)
    reply = send(http_sandbox, client, token, message=json_message())
    assert reply.status_code == 401
    assert reply.json()["error"]["code"] == "InvalidAuthenticationToken"
    assert "WWW-Authenticate" in reply.headers
    assert http_sandbox.ctx.store.list() == []


def test_missing_permission_is_403(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    token = app_token(http_sandbox, client, client_id=WEAK_APP)  # Mail.ReadWrite only
    reply = send(http_sandbox, client, token, message=json_message())
    assert reply.status_code == 403
    assert reply.json()["error"] == {
        "code": "ErrorAccessDenied",
        "message": "Access is denied. Check credentials and try again.",
        "innerError": reply.json()["error"]["innerError"],
    }


def test_mailbox_outside_app_scope_is_403(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    token = app_token(http_sandbox, client)  # scoped to scanner@ and noreply@
    reply = send(http_sandbox, client, token, mailbox=ALICE, message=json_message())
    assert reply.status_code == 403
    assert reply.json()["error"]["code"] == "ErrorAccessDenied"
    assert http_sandbox.ctx.store.rejections()["graph 403 ErrorAccessDenied"] == 1


def test_unknown_user_is_404(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    token = app_token(http_sandbox, client)
    reply = send(http_sandbox, client, token, mailbox="ghost@contoso.test", message=json_message())
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "ErrorInvalidUser"


def test_no_recipients_is_400(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    token = app_token(http_sandbox, client)
    message = json_message(toRecipients=[], ccRecipients=[], bccRecipients=[])
    reply = send(http_sandbox, client, token, message=message)
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "ErrorInvalidRecipients"


def test_request_over_size_limit_is_413(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    http_sandbox.set_limits(graph_max_request_bytes=64 * 1024)
    token = app_token(http_sandbox, client)
    big = {
        "@odata.type": "#microsoft.graph.fileAttachment",
        "name": "big.bin",
        "contentType": "application/octet-stream",
        "contentBytes": base64.b64encode(b"x" * 60 * 1024).decode(),
    }
    reply = send(http_sandbox, client, token, message=json_message(attachments=[big]))
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "RequestEntityTooLarge"
    assert http_sandbox.ctx.store.list() == []


def test_delegated_token_sends_from_me(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    authority = http_sandbox.authority
    flow = client.post(
        f"{authority}/oauth2/v2.0/devicecode",
        data={"client_id": PUBLIC_APP, "scope": f"{GRAPH}/Mail.Send offline_access"},
    ).json()
    approved = client.post(
        f"{http_sandbox.base_url}/_sandbox/devicecode/approve",
        json={"user_code": flow["user_code"], "address": ALICE, "password": ALICE_PASSWORD},
    )
    assert approved.status_code == 200
    tokens = client.post(
        f"{authority}/oauth2/v2.0/token",
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "client_id": PUBLIC_APP,
            "device_code": flow["device_code"],
        },
    ).json()
    assert tokens["scope"] == f"{GRAPH}/Mail.Send"
    headers = {"Authorization": f"Bearer {tokens['access_token']}"}
    message = json_message(toRecipients=[{"emailAddress": {"address": SCANNER}}])
    reply = client.post(f"{http_sandbox.graph_url}/me/sendMail", headers=headers, json={"message": message})
    assert reply.status_code == 202, reply.text
    stored = http_sandbox.ctx.store.list(mailbox=SCANNER, folder="Inbox")
    assert stored[0].authenticated_as == f"{ALICE} (Graph delegated, app {PUBLIC_APP})"
    assert stored[0].mail_from == ALICE
    # A delegated token cannot act for another mailbox.
    other = client.post(
        f"{http_sandbox.graph_url}/users/{SCANNER}/sendMail", headers=headers, json={"message": message}
    )
    assert other.status_code == 403


def test_certificate_app_without_readwrite_cannot_draft(
    http_sandbox: HttpSandbox, client: httpx.Client
) -> None:
    token = http_sandbox.ctx.issuer.issue(
        app=http_sandbox.ctx.tenant.apps[CERT_APP],
        audience=GRAPH,
        roles=frozenset({"Mail.Send"}),
        scopes=None,
        upn=None,
    )
    reply = client.post(
        f"{http_sandbox.graph_url}/users/{ALICE}/messages",
        headers={"Authorization": f"Bearer {token}"},
        json=json_message(),
    )
    assert reply.status_code == 403


def test_unlicensed_mailbox_and_bad_json(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    # CERT_APP has a certificate only; mint its token directly to reach the checks behind auth.
    token = http_sandbox.ctx.issuer.issue(
        app=http_sandbox.ctx.tenant.apps[CERT_APP],
        audience=GRAPH,
        roles=frozenset({"Mail.Send"}),
        scopes=None,
        upn=None,
    )
    headers = {"Authorization": f"Bearer {token}"}
    unlicensed = client.post(
        f"{http_sandbox.graph_url}/users/intern@contoso.test/sendMail",
        headers=headers,
        json={"message": json_message()},
    )
    assert unlicensed.status_code == 404
    assert unlicensed.json()["error"]["code"] == "MailboxNotEnabledForRESTAPI"
    broken = client.post(
        f"{http_sandbox.graph_url}/users/{ALICE}/sendMail",
        headers={**headers, "Content-Type": "application/json"},
        content=b"{not json",
    )
    assert broken.status_code == 400
    assert broken.json()["error"]["code"] == "RequestBodyRead"
