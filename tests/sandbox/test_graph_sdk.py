"""Microsoft's own clients against the sandbox, used exactly as an application uses them.

``azure-identity``'s ``ClientSecretCredential`` gets the token from the sandbox's identity platform
(``authority`` = the sandbox, the sandbox CA through ``connection_verify``, instance discovery off as
for any non-public cloud), and ``msgraph-sdk``'s ``GraphServiceClient`` sends through a
``GraphRequestAdapter`` whose ``base_url`` is the sandbox's ``/v1.0`` and whose httpx client trusts the
sandbox CA. Three sends: sendMail JSON (the SDK writes ``Message``/``SaveToSentItems``), MIME (the SDK
has no method for it; Microsoft's advice is to reuse the request adapter with a text/plain body) and a
large attachment through a draft and ``createUploadSession`` (the chunks are PUT to the upload URL as
Microsoft's guide shows, without an Authorization header: msgraph-core's ``LargeFileUploadTask`` cannot
upload Outlook attachments, because Graph answers ``nextExpectedRanges: ["{start}"]`` for them and the
task expects ``"start-end"``; microsoftgraph/msgraph-sdk-python-core#691, open).
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import aiosmtplib
import httpx
import pytest
from azure.identity.aio import ClientSecretCredential
from kiota_abstractions.method import Method
from kiota_abstractions.request_information import RequestInformation
from kiota_authentication_azure.azure_identity_authentication_provider import (
    AzureIdentityAuthenticationProvider,
)
from msgraph import GraphRequestAdapter, GraphServiceClient
from msgraph.generated.models.attachment_item import AttachmentItem
from msgraph.generated.models.attachment_type import AttachmentType
from msgraph.generated.models.body_type import BodyType
from msgraph.generated.models.email_address import EmailAddress
from msgraph.generated.models.file_attachment import FileAttachment
from msgraph.generated.models.item_body import ItemBody
from msgraph.generated.models.message import Message
from msgraph.generated.models.o_data_errors.o_data_error import ODataError
from msgraph.generated.models.recipient import Recipient
from msgraph.generated.users.item.messages.item.attachments.create_upload_session.create_upload_session_post_request_body import (  # noqa: E501
    CreateUploadSessionPostRequestBody,
)
from msgraph.generated.users.item.send_mail.send_mail_post_request_body import SendMailPostRequestBody
from msgraph_core import GraphClientFactory

from relay365.sandbox.runner import Sandbox
from tests.sandbox.http_fixtures import ALICE, BOB, SCANNER, SECRET, SECRET_APP, TENANT_ID, make_tenant

pytestmark = pytest.mark.timeout(120)

GRAPH_SCOPE = "https://graph.microsoft.com/.default"


class Graph:
    """An application's Graph client for the sandbox, and the sandbox it talks to."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.credential = ClientSecretCredential(
            TENANT_ID,
            SECRET_APP,
            SECRET,
            authority=sandbox.base_url,
            disable_instance_discovery=True,
            connection_verify=str(sandbox.ca_path),
        )
        auth = AzureIdentityAuthenticationProvider(self.credential, scopes=[GRAPH_SCOPE])
        self.http = httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(sandbox.ca_path)))
        # msgraph-core wraps the client's transport in an AsyncGraphTransport that has no aclose(),
        # so closing the client would leave its connection pool open: keep the pool to close it.
        self.pool = self.http._transport
        adapter = GraphRequestAdapter(
            auth, GraphClientFactory.create_with_default_middleware(client=self.http)
        )
        adapter.base_url = sandbox.graph_url
        self.adapter = adapter
        self.client = GraphServiceClient(request_adapter=adapter)

    async def close(self) -> None:
        await self.http.aclose()
        await self.pool.aclose()
        await self.credential.close()

    def stored(self, mailbox: str, folder: str = "Inbox") -> list[EmailMessage]:
        store = self.sandbox.ctx.store
        found = []
        for meta in store.list(mailbox=mailbox, folder=folder):
            parsed = BytesParser(policy=policy.default).parsebytes(store.content(meta.id))
            assert isinstance(parsed, EmailMessage)
            found.append(parsed)
        return found


@pytest.fixture
def limits() -> dict[str, int]:
    """Limits fields for the sandbox tenant (a test overrides this fixture to change them)."""
    return {}


@pytest.fixture
async def graph(tmp_path: Path, limits: dict[str, int]) -> AsyncIterator[Graph]:
    async with Sandbox(make_tenant(**limits), state_dir=tmp_path / "sandbox") as sandbox:
        client = Graph(sandbox)
        try:
            yield client
        finally:
            await client.close()


def to(*addresses: str) -> list[Recipient]:
    return [Recipient(email_address=EmailAddress(address=a)) for a in addresses]


async def test_send_mail_json_with_the_sdk(graph: Graph) -> None:
    body = SendMailPostRequestBody(
        message=Message(
            subject="Scan 0042",
            body=ItemBody(content_type=BodyType.Text, content="Your scan is attached."),
            to_recipients=to(ALICE),
            bcc_recipients=to(BOB),
            attachments=[
                FileAttachment(
                    name="scan.pdf", content_type="application/pdf", content_bytes=b"%PDF-1.4 scan"
                )
            ],
        ),
        save_to_sent_items=False,
    )
    await graph.client.users.by_user_id(SCANNER).send_mail.post(body)
    (received,) = graph.stored(ALICE)
    assert received["Subject"] == "Scan 0042" and received["Bcc"] is None
    (attachment,) = list(received.iter_attachments())
    assert attachment.get_filename() == "scan.pdf" and attachment.get_content() == b"%PDF-1.4 scan"
    assert len(graph.stored(BOB)) == 1
    assert graph.stored(SCANNER, "SentItems") == []  # SaveToSentItems: false, as the SDK spelled it


async def test_send_mail_mime_through_the_sdk_request_adapter(graph: Graph) -> None:
    mime = EmailMessage()
    mime["From"] = SCANNER
    mime["To"] = ALICE
    mime["Subject"] = "MIME from the SDK"
    mime["X-Device"] = "mfp-2nd-floor"
    mime.set_content("Sent as MIME.\n")
    request = graph.client.users.by_user_id(SCANNER).send_mail.to_post_request_information(
        SendMailPostRequestBody()
    )
    request.headers.clear()
    request.headers.try_add("Content-Type", "text/plain")
    request.set_stream_content(base64.b64encode(mime.as_bytes()))
    await graph.adapter.send_no_response_content_async(request, {"XXX": ODataError})
    (received,) = graph.stored(ALICE)
    assert received["X-Device"] == "mfp-2nd-floor" and received.get_content().rstrip() == "Sent as MIME."
    assert len(graph.stored(SCANNER, "SentItems")) == 1


async def test_large_attachment_through_an_upload_session(graph: Graph) -> None:
    user = graph.client.users.by_user_id(SCANNER)
    draft = await user.messages.post(
        Message(
            subject="Big scan",
            body=ItemBody(content_type=BodyType.Text, content="x"),
            to_recipients=to(ALICE),
        )
    )
    assert draft is not None and draft.id
    data = bytes(range(256)) * (3 * 4096 + 7)  # 3 MB and a bit: the upload-session minimum is 3 MB
    session = await user.messages.by_message_id(draft.id).attachments.create_upload_session.post(
        CreateUploadSessionPostRequestBody(
            attachment_item=AttachmentItem(
                attachment_type=AttachmentType.File, name="scan.tif", size=len(data)
            )
        )
    )
    assert session is not None and session.upload_url and session.next_expected_ranges == ["0-"]
    chunk = 3 * 320 * 1024  # "a multiple of 320 KiB" (Microsoft's guide)
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(graph.sandbox.ca_path))) as put:
        for start in range(0, len(data), chunk):
            part = data[start : start + chunk]
            reply = await put.put(
                session.upload_url,
                content=part,
                headers={"Content-Range": f"bytes {start}-{start + len(part) - 1}/{len(data)}"},
            )
            done = start + len(part) == len(data)
            assert reply.status_code == (201 if done else 200), reply.text
            if not done:  # Outlook attachments: "a single value {start}" (uploadSession resource)
                assert reply.json()["nextExpectedRanges"] == [str(start + len(part))]
            assert reply.headers["request-id"] and reply.headers["client-request-id"]
    await user.messages.by_message_id(draft.id).send.post()
    (received,) = graph.stored(ALICE)
    (attachment,) = list(received.iter_attachments())
    assert attachment.get_filename() == "scan.tif" and attachment.get_content() == data


async def test_sdk_errors_carry_graph_codes_and_request_ids(graph: Graph) -> None:
    user = graph.client.users.by_user_id(SCANNER)
    body = SendMailPostRequestBody(
        message=Message(subject="no recipients", body=ItemBody(content_type=BodyType.Text, content="x"))
    )
    with pytest.raises(ODataError) as refused:
        await user.send_mail.post(body)
    error = refused.value
    assert error.response_status_code == 400
    assert error.error is not None and error.error.code == "ErrorInvalidRecipients"
    headers = {k.lower(): v for k, v in (error.response_headers or {}).items()}
    inner = error.error.inner_error
    assert inner is not None and inner.request_id == headers["request-id"]
    assert "x-ms-ags-diagnostic" in headers and "date" in headers
    # A body parameter of the wrong type: Graph's error text names the expected type.
    request = RequestInformation(Method.POST, f"{graph.sandbox.graph_url}/users/{SCANNER}/sendMail")
    request.set_stream_content(b'{"Message": {"Subject": "x"}, "SaveToSentItems": "no"}', "application/json")
    with pytest.raises(ODataError) as typed:
        await graph.adapter.send_no_response_content_async(request, {"XXX": ODataError})
    assert typed.value.error is not None and typed.value.error.code == "BadRequest"


@pytest.mark.parametrize("limits", [{"recipients_per_day": 3, "messages_per_minute": 1}])
async def test_mailbox_sending_limits_apply_to_graph_as_to_smtp(graph: Graph, limits: dict[str, int]) -> None:
    """Exchange counts a mailbox's recipients and messages whatever client sends: SMTP AUTH and Graph
    share the rolling 24-hour recipient limit and the per-minute message rate."""
    token = await graph.credential.get_token("https://outlook.office365.com/.default")
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=graph.sandbox.submission_port, timeout=10)
    await smtp.connect(tls_context=ssl.create_default_context(cafile=str(graph.sandbox.ca_path)))
    assert (await smtp.auth_xoauth2(SCANNER, token.token)).code == 235
    mime = EmailMessage()
    mime["From"], mime["To"], mime["Subject"] = SCANNER, f"{ALICE}, {BOB}", "by SMTP"
    mime.set_content("x")
    await smtp.send_message(mime)  # two of the mailbox's three recipients today
    await smtp.quit()
    user = graph.client.users.by_user_id(SCANNER)
    over = SendMailPostRequestBody(
        message=Message(subject="by Graph", body=ItemBody(content=""), to_recipients=to(ALICE, BOB)),
        save_to_sent_items=False,
    )
    await user.send_mail.post(over)  # 202: Graph accepts, transport refuses (fire and forget)
    assert [m["Subject"] for m in graph.stored(ALICE)] == ["by SMTP"]
    (ndr,) = graph.stored(SCANNER)
    assert ndr["Subject"] == "Undeliverable: by Graph" and ndr.get_content_type() == "multipart/report"
    assert "550 5.1.90" in ndr.as_string()
    one = SendMailPostRequestBody(
        message=Message(subject="last one", body=ItemBody(content=""), to_recipients=to(ALICE)),
        save_to_sent_items=False,
    )
    await user.send_mail.post(one)  # the third recipient fits; the second message this minute is
    assert [m["Subject"] for m in graph.stored(ALICE)] == ["by SMTP", "last one"]  # delayed, not refused
    rejections = graph.sandbox.ctx.store.rejections()
    assert rejections == {"graph 550 5.1.90": 1, "graph throttled": 1}
