"""Large attachments: draft, upload session, chunked PUTs of at most 4 MB, send (httpx, HTTPS)."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from email import policy
from email.parser import BytesParser
from typing import Any

import httpx
import pytest

from tests.sandbox.http_fixtures import ALICE, SCANNER, SECRET, SECRET_APP, HttpSandbox, http_sandbox

__all__ = ["http_sandbox"]

GRAPH = "https://graph.microsoft.com"
CHUNK = 4 * 1024 * 1024


@pytest.fixture
def client(http_sandbox: HttpSandbox) -> Iterator[httpx.Client]:
    with httpx.Client(verify=http_sandbox.ssl_context(), timeout=60) as made:
        yield made


@pytest.fixture
def headers(http_sandbox: HttpSandbox, client: httpx.Client) -> dict[str, str]:
    reply = client.post(
        f"{http_sandbox.authority}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": SECRET_APP,
            "client_secret": SECRET,
            "scope": f"{GRAPH}/.default",
        },
    )
    return {"Authorization": f"Bearer {reply.json()['access_token']}"}


def draft(sandbox: HttpSandbox, client: httpx.Client, headers: dict[str, str]) -> dict[str, Any]:
    reply = client.post(
        f"{sandbox.graph_url}/users/{SCANNER}/messages",
        headers=headers,
        json={
            "subject": "Large scan",
            "body": {"contentType": "HTML", "content": "<p>see attachment</p>"},
            "toRecipients": [{"emailAddress": {"address": ALICE}}],
        },
    )
    assert reply.status_code == 201, reply.text
    assert reply.json()["isDraft"] is True
    return dict(reply.json())


def session(
    sandbox: HttpSandbox, client: httpx.Client, headers: dict[str, str], mid: str, size: int
) -> httpx.Response:
    return client.post(
        f"{sandbox.graph_url}/users/{SCANNER}/messages/{mid}/attachments/createUploadSession",
        headers=headers,
        json={"AttachmentItem": {"attachmentType": "file", "name": "scan.tif", "size": size}},
    )


def test_ten_megabyte_attachment_through_upload_session(
    http_sandbox: HttpSandbox, client: httpx.Client, headers: dict[str, str]
) -> None:
    data = os.urandom(10 * 1024 * 1024)
    mid = draft(http_sandbox, client, headers)["id"]
    created = session(http_sandbox, client, headers, mid, len(data))
    assert created.status_code == 201, created.text
    assert created.json()["nextExpectedRanges"] == ["0-"]
    upload_url = created.json()["uploadUrl"]
    statuses = []
    for start in range(0, len(data), CHUNK):
        chunk = data[start : start + CHUNK]
        end = start + len(chunk) - 1
        put = client.put(  # no Authorization header: the URL carries its own token
            upload_url,
            content=chunk,
            headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"},
        )
        statuses.append(put.status_code)
        if put.status_code == 200:
            assert put.json()["nextExpectedRanges"] == [str(end + 1)]
    assert statuses == [200, 200, 201]
    sent = client.post(f"{http_sandbox.graph_url}/users/{SCANNER}/messages/{mid}/send", headers=headers)
    assert sent.status_code == 202
    inbox = http_sandbox.ctx.store.list(mailbox=ALICE, folder="Inbox")
    assert len(inbox) == 1
    message = BytesParser(policy=policy.default).parsebytes(http_sandbox.ctx.store.content(inbox[0].id))
    attachment = next(message.iter_attachments())
    assert attachment.get_filename() == "scan.tif"
    payload = attachment.get_content()
    assert hashlib.sha256(payload).digest() == hashlib.sha256(data).digest()
    assert len(http_sandbox.ctx.store.list(mailbox=SCANNER, folder="SentItems")) == 1
    # The draft is gone once sent.
    again = client.post(f"{http_sandbox.graph_url}/users/{SCANNER}/messages/{mid}/send", headers=headers)
    assert again.status_code == 404


def test_upload_refusals(http_sandbox: HttpSandbox, client: httpx.Client, headers: dict[str, str]) -> None:
    mid = draft(http_sandbox, client, headers)["id"]
    small = session(http_sandbox, client, headers, mid, 1024)
    assert small.status_code == 400
    assert small.json()["error"]["code"] == "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize"
    size = 9 * 1024 * 1024
    upload_url = session(http_sandbox, client, headers, mid, size).json()["uploadUrl"]
    too_big = b"y" * (CHUNK + 1)
    over = client.put(upload_url, content=too_big, headers={"Content-Range": f"bytes 0-{CHUNK}/{size}"})
    assert over.status_code == 413
    gap = client.put(upload_url, content=b"z" * 10, headers={"Content-Range": f"bytes 5-14/{size}"})
    assert gap.status_code == 416
    wrong_token = upload_url.replace("authtoken=", "authtoken=x")
    stranger = client.put(wrong_token, content=b"z", headers={"Content-Range": f"bytes 0-0/{size}"})
    assert stranger.status_code == 404
    assert client.delete(upload_url).status_code == 204
    gone = client.put(upload_url, content=b"z", headers={"Content-Range": f"bytes 0-0/{size}"})
    assert gone.status_code == 404


def test_mime_draft_with_small_attachment(
    http_sandbox: HttpSandbox, client: httpx.Client, headers: dict[str, str]
) -> None:
    mime = f"From: {SCANNER}\r\nTo: {ALICE}\r\nSubject: mime draft\r\n\r\nbody\r\n".encode()
    created = client.post(
        f"{http_sandbox.graph_url}/users/{SCANNER}/messages",
        headers={**headers, "Content-Type": "text/plain"},
        content=base64.b64encode(mime),
    )
    assert created.status_code == 201, created.text
    mid = created.json()["id"]
    attached = client.post(
        f"{http_sandbox.graph_url}/users/{SCANNER}/messages/{mid}/attachments",
        headers=headers,
        json={
            "@odata.type": "#microsoft.graph.fileAttachment",
            "name": "note.txt",
            "contentType": "text/plain",
            "contentBytes": base64.b64encode(b"small note").decode(),
        },
    )
    assert attached.status_code == 201, attached.text
    sent = client.post(f"{http_sandbox.graph_url}/users/{SCANNER}/messages/{mid}/send", headers=headers)
    assert sent.status_code == 202
    stored = http_sandbox.ctx.store.list(mailbox=ALICE, folder="Inbox")
    message = BytesParser(policy=policy.default).parsebytes(http_sandbox.ctx.store.content(stored[0].id))
    assert message["Subject"] == "mime draft"
    names = [part.get_filename() for part in message.iter_attachments()]
    assert names == ["note.txt"]
