"""Graph sendMail in the message trace, and Microsoft's own SDK reading the sandbox's trace.

``msgraph-sdk`` (the Python SDK generated from Graph's metadata) has request builders for
``admin/exchange/tracing/messageTraces`` and ``getDetailsByRecipient``: if it parses the sandbox's
answers into ``ExchangeMessageTrace`` / ``ExchangeMessageTraceDetail`` objects, field names, enum
values and the collection shape are Graph's.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from azure.identity.aio import ClientSecretCredential
from kiota_abstractions.base_request_configuration import RequestConfiguration
from kiota_authentication_azure.azure_identity_authentication_provider import (
    AzureIdentityAuthenticationProvider,
)
from msgraph import GraphRequestAdapter, GraphServiceClient
from msgraph.generated.admin.exchange.tracing.message_traces.message_traces_request_builder import (
    MessageTracesRequestBuilder,
)
from msgraph.generated.models.exchange_message_trace_status import ExchangeMessageTraceStatus
from msgraph_core import GraphClientFactory

from relay365.sandbox.runner import Sandbox
from tests.sandbox.sandbox_helpers import ALICE, BOB, EXTERNAL, GRAPH_APP, SCANNER, message
from tests.sandbox.trace_helpers import SECRET, TRACE_APP, direct_send, trace_rows, trace_tenant

pytestmark = pytest.mark.timeout(120)

GRAPH_RESOURCE = "https://graph.microsoft.com"


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    tenant = trace_tenant()
    tenant = dataclasses.replace(tenant, limits=dataclasses.replace(tenant.limits, recipients_per_day=3))
    async with Sandbox(tenant, state_dir=tmp_path) as running:
        yield running


def mail_token(sandbox: Sandbox) -> str:
    app = sandbox.ctx.tenant.apps[GRAPH_APP]
    return sandbox.ctx.issuer.issue(
        app=app, audience=GRAPH_RESOURCE, roles=frozenset({"Mail.Send"}), scopes=None, upn=None
    )


async def send_mail(sandbox: Sandbox, subject: str, recipients: list[str]) -> httpx.Response:
    body = {
        "message": {
            "subject": subject,
            "body": {"contentType": "Text", "content": "Report attached."},
            "toRecipients": [{"emailAddress": {"address": r}} for r in recipients],
        },
        "saveToSentItems": False,
    }
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(sandbox.ca_path))) as http:
        return await http.post(
            f"{sandbox.graph_url}/users/{SCANNER}/sendMail",
            json=body,
            headers={"Authorization": f"Bearer {mail_token(sandbox)}"},
        )


async def test_graph_send_mail_is_traced_and_a_refusal_after_202_is_failed(sandbox: Sandbox) -> None:
    """sendMail: one record per recipient (the From: address as sender, no fromIP); over the daily
    recipient limit Graph still answers 202, the NDR goes to the sender and the trace says Failed."""
    assert (await send_mail(sandbox, "Monthly", [ALICE, EXTERNAL])).status_code == 202
    rows = sorted(
        (r for r in trace_rows(sandbox) if r["subject"] == "Monthly"), key=lambda r: r["recipientAddress"]
    )
    assert [(r["recipientAddress"], r["status"], r["senderAddress"], r["fromIP"]) for r in rows] == [
        (ALICE, "delivered", SCANNER, ""),
        (EXTERNAL, "delivered", SCANNER, ""),
    ]
    assert (await send_mail(sandbox, "Too many", [ALICE, BOB])).status_code == 202
    failed = [r for r in trace_rows(sandbox) if r["subject"] == "Too many"]
    assert sorted((r["recipientAddress"], r["status"]) for r in failed) == [
        (ALICE, "failed"),
        (BOB, "failed"),
    ]
    (record,) = [r for r in sandbox.ctx.trace.records() if r.subject == "Too many" and r.recipient == ALICE]
    assert "550 5.1.90" in record.events[-1].description
    assert any(m.subject == "Undeliverable: Too many" for m in sandbox.ctx.store.list(mailbox=SCANNER))


async def test_msgraph_sdk_reads_the_trace_and_the_details(sandbox: Sandbox) -> None:
    await direct_send(
        sandbox, "printer@outside.test", [ALICE], message("printer@outside.test", ALICE, "Spoof").as_bytes()
    )
    await direct_send(sandbox, SCANNER, [ALICE, BOB], message(SCANNER, ALICE, "Fine").as_bytes())
    credential = ClientSecretCredential(
        sandbox.ctx.tenant.tenant_id,
        TRACE_APP,
        SECRET,
        authority=sandbox.base_url,
        disable_instance_discovery=True,
        connection_verify=str(sandbox.ca_path),
    )
    http = httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(sandbox.ca_path)))
    pool = http._transport
    try:
        auth = AzureIdentityAuthenticationProvider(credential, scopes=[f"{GRAPH_RESOURCE}/.default"])
        adapter = GraphRequestAdapter(auth, GraphClientFactory.create_with_default_middleware(client=http))
        adapter.base_url = sandbox.graph_url
        client = GraphServiceClient(request_adapter=adapter)
        traces = client.admin.exchange.tracing.message_traces
        query = MessageTracesRequestBuilder.MessageTracesRequestBuilderGetQueryParameters(
            filter=f"recipientAddress eq '{ALICE}'", top=10
        )
        page = await traces.get(request_configuration=RequestConfiguration(query_parameters=query))
        assert page is not None and page.value is not None
        by_subject = {t.subject: t for t in page.value}
        assert set(by_subject) == {"Spoof", "Fine"}
        spoof = by_subject["Spoof"]
        assert spoof.status == ExchangeMessageTraceStatus.FilteredAsSpam
        assert by_subject["Fine"].status == ExchangeMessageTraceStatus.Delivered
        assert spoof.sender_address == "printer@outside.test" and spoof.from_i_p == "127.0.0.1"
        assert spoof.received_date_time is not None and spoof.size and spoof.size > 0
        assert spoof.id is not None
        details = (
            await traces.by_exchange_message_trace_id(spoof.id)
            .get_details_by_recipient_with_recipient_address(ALICE)
            .get()
        )
        assert details is not None and details.value is not None
        assert [d.event for d in details.value] == ["Receive", "Spam Diagnostics", "Deliver"]
        assert (
            details.value[0].date_time is not None
            and details.value[1].data
            and "CompAuth" in details.value[1].data
        )
    finally:
        await http.aclose()
        await pool.aclose()
        await credential.close()
