"""What every Graph response carries (ids, Date, diagnostic) and how Graph reads request bodies."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from email.utils import parsedate_to_datetime

import httpx
import pytest

from tests.sandbox.http_fixtures import ALICE, SCANNER, SECRET, SECRET_APP, HttpSandbox, http_sandbox

__all__ = ["http_sandbox"]


@pytest.fixture
def client(http_sandbox: HttpSandbox) -> Iterator[httpx.Client]:
    with httpx.Client(verify=http_sandbox.ssl_context(), timeout=20) as made:
        yield made


def bearer(sandbox: HttpSandbox, client: httpx.Client) -> dict[str, str]:
    reply = client.post(
        f"{sandbox.authority}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": SECRET_APP,
            "client_secret": SECRET,
            "scope": "https://graph.microsoft.com/.default",
        },
    )
    assert reply.status_code == 200, reply.text
    assert parsedate_to_datetime(reply.headers["date"])  # identity responses carry Date too
    return {"Authorization": f"Bearer {reply.json()['access_token']}"}


def assert_graph_headers(reply: httpx.Response, client_request_id: str | None = None) -> str:
    """The headers every Graph response carries; returns its request-id."""
    request_id = reply.headers["request-id"]
    uuid.UUID(request_id)
    assert reply.headers["client-request-id"] == (client_request_id or request_id)
    assert parsedate_to_datetime(reply.headers["date"]).tzinfo is not None
    assert len(reply.headers.get_list("date")) == 1
    info = json.loads(reply.headers["x-ms-ags-diagnostic"])["ServerInfo"]
    assert {"DataCenter", "Slice", "Ring", "ScaleUnit", "RoleInstance"} <= set(info)
    return request_id


def message(**extra: object) -> dict[str, object]:
    return {
        "subject": "Scan",
        "body": {"contentType": "Text", "content": "x"},
        "toRecipients": [{"emailAddress": {"address": ALICE}}],
        **extra,
    }


def test_every_graph_response_carries_ids_date_and_diagnostic(
    http_sandbox: HttpSandbox, client: httpx.Client
) -> None:
    headers = bearer(http_sandbox, client)
    url = f"{http_sandbox.graph_url}/users/{SCANNER}"
    accepted = client.post(f"{url}/sendMail", headers=headers, json={"message": message()})
    assert accepted.status_code == 202 and accepted.content == b""
    first = assert_graph_headers(accepted)
    # The client's own id is echoed; every request gets a new request-id.
    mine = str(uuid.uuid4())
    draft = client.post(f"{url}/messages", headers={**headers, "client-request-id": mine}, json=message())
    assert draft.status_code == 201
    assert assert_graph_headers(draft, mine) != first
    # Errors: the body's innerError names the same ids as the headers.
    refused = client.post(f"{url}/sendMail", headers={"client-request-id": mine}, json={})
    assert refused.status_code == 401
    request_id = assert_graph_headers(refused, mine)
    inner = refused.json()["error"]["innerError"]
    assert (inner["request-id"], inner["client-request-id"]) == (request_id, mine)
    # An injected fault is a Graph response too.
    faults = f"{http_sandbox.base_url}/_sandbox/faults"
    assert client.post(faults, json={"endpoint": "graph", "stage": "request", "reply": "503"}).is_success
    unavailable = client.post(f"{url}/sendMail", headers=headers, json={"message": message()})
    assert unavailable.status_code == 503
    assert unavailable.json()["error"]["innerError"]["request-id"] == assert_graph_headers(unavailable)


def test_body_names_match_without_regard_to_case(http_sandbox: HttpSandbox, client: httpx.Client) -> None:
    headers = bearer(http_sandbox, client)
    url = f"{http_sandbox.graph_url}/users/{SCANNER}/sendMail"
    body = {
        "MESSAGE": {
            "Subject": "Case",
            "BODY": {"ContentType": "TEXT", "Content": "x"},
            "ToRecipients": [{"EmailAddress": {"Address": ALICE, "Name": "Alice"}}],
            "Attachments": [
                {
                    "@odata.type": "#microsoft.graph.FILEATTACHMENT",
                    "Name": "a.txt",
                    "ContentBytes": "aGVsbG8=",
                }
            ],
        },
        "SAVETOSENTITEMS": False,
    }
    reply = client.post(url, headers=headers, json=body)
    assert reply.status_code == 202, reply.text
    store = http_sandbox.ctx.store
    (meta,) = store.list(mailbox=ALICE)
    assert meta.subject == "Case" and b"a.txt" in store.content(meta.id)
    assert store.list(mailbox=SCANNER, folder="SentItems") == []  # SAVETOSENTITEMS honoured
    # The same property twice in different case is ambiguous: a bad request.
    twice = client.post(
        url,
        headers={**headers, "Content-Type": "application/json"},
        content=b'{"message": {"subject": "a"}, "Message": {"subject": "b"}}',
    )
    assert twice.status_code == 400 and twice.json()["error"]["code"] == "BadRequest"
