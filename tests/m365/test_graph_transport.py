"""Device -> relay365 -> Graph sendMail in the sandbox: MIME fidelity, Bcc, large messages, errors."""

from __future__ import annotations

import asyncio
import email.policy
import os
from email import message_from_bytes
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from relay365.sandbox.runner import Sandbox
from relay365.service.relay import Relay
from tests.support import make_settings, oauth, running_relay
from tests.support.m365 import send, wait_until


def graph(sb: Sandbox, **extra: Any) -> dict[str, Any]:
    return {
        "name": "graph",
        "type": "graph",
        "mailbox": "scanner@contoso.test",
        "graph_url": sb.graph_url,
        "ca_file": str(sb.ca_path),
        **oauth(sb),
        **extra,
    }


async def state_of(relay: Relay, qid: str, state: str, timeout: float = 15.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        entry = await relay.spool.get(qid)
        if entry.recipients[0].state.value == state:
            return entry
        assert loop.time() < deadline, f"{qid} never became {state}: {entry}"
        await asyncio.sleep(0.05)


async def drained(relay: Relay) -> None:
    assert relay.scheduler is not None
    await relay.scheduler.drain()


async def test_graph_mime_with_envelope_bcc(tmp_path: Path, sandbox: Sandbox) -> None:
    settings = make_settings(tmp_path, transport=[graph(sandbox)])
    body = (
        b"From: scanner@contoso.test\r\nTo: alice@contoso.test\r\nSubject: via graph\r\n"
        b"Message-ID: <graph-1@printer.lan>\r\n\r\nscanned page\r\n"
    )
    async with running_relay(settings) as relay:
        await send(relay, "scanner@contoso.test", ["alice@contoso.test", "hidden@example.org"], body)
        store = sandbox.ctx.store
        await wait_until(lambda: len(store.list(folder="SentItems")) == 1)
        [inbox] = store.list(mailbox="alice@contoso.test", folder="Inbox")
        [outside] = store.list(folder="Internet")
        assert outside.mailbox == "hidden@example.org" and inbox.endpoint == "graph"
        for m in (inbox, outside):
            content = store.content(m.id)
            assert b"Bcc" not in content and b"hidden@example.org" not in content.split(b"\r\n\r\n")[0]
            assert message_from_bytes(content)["Message-ID"] == "<graph-1@printer.lan>"
        await drained(relay)
        assert await relay.spool.list() == []


async def test_graph_large_message_goes_through_upload_session(tmp_path: Path, sandbox: Sandbox) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "scanner@contoso.test", "alice@contoso.test", "10 MB scan"
    msg.set_content("The scan is attached.")
    payload = os.urandom(10 * 1024 * 1024)
    msg.add_attachment(payload, maintype="application", subtype="pdf", filename="scan.pdf")
    settings = make_settings(
        tmp_path,
        transport=[graph(sandbox)],
        listener=[{"name": "lan", "port": 0, "tls": "starttls", "max_message_size": 40 * 1024 * 1024}],
    )
    async with running_relay(settings) as relay:
        raw = msg.as_bytes(policy=email.policy.SMTP)
        await send(relay, "scanner@contoso.test", ["alice@contoso.test"], raw)

        store = sandbox.ctx.store
        await wait_until(lambda: len(store.list(mailbox="alice@contoso.test", folder="Inbox")) == 1, 60)
        [got] = store.list(mailbox="alice@contoso.test", folder="Inbox")
        received = message_from_bytes(store.content(got.id), policy=email.policy.default)
        assert isinstance(received, EmailMessage)
        [att] = list(received.iter_attachments())
        assert att.get_filename() == "scan.pdf" and att.get_content() == payload


async def test_graph_wrong_secret_defers_then_delivers(
    tmp_path: Path, sandbox: Sandbox, monkeypatch: Any
) -> None:
    monkeypatch.setenv("RELAY365_TEST_APP_SECRET", "wrong-secret")
    settings = make_settings(tmp_path, transport=[graph(sandbox)])
    async with running_relay(settings) as relay:
        qid = await send(relay, "scanner@contoso.test", ["alice@contoso.test"], b"Subject: t\r\n\r\nx\r\n")
        entry = await state_of(relay, qid, "deferred")
        assert "invalid_client" in entry.recipients[0].last_reply
        assert sandbox.ctx.store.list(mailbox="alice@contoso.test") == []
    # The admin fixes the secret; the same queue entry is delivered after a restart.
    monkeypatch.setenv("RELAY365_TEST_APP_SECRET", "sandbox-secret-relay365")
    async with running_relay(make_settings(tmp_path, transport=[graph(sandbox)])) as relay:
        await relay.spool.retry(qid, 0)
        assert relay.scheduler is not None
        relay.scheduler.wake()
        await wait_until(lambda: len(sandbox.ctx.store.list(mailbox="alice@contoso.test")) == 1)


async def test_graph_send_as_denied_bounces(tmp_path: Path, sandbox: Sandbox) -> None:
    settings = make_settings(tmp_path, transport=[graph(sandbox)])
    async with running_relay(settings) as relay:
        qid = await send(
            relay,
            "alice@contoso.test",
            ["bob@fabrikam.test"],
            b"From: ceo@contoso.test\r\nTo: bob@fabrikam.test\r\nSubject: x\r\n\r\nx\r\n",
        )
        await drained(relay)
        await asyncio.sleep(0.1)
        await drained(relay)
        assert qid not in {e.queue_id for e in await relay.spool.list()}
        assert sandbox.ctx.store.list(mailbox="bob@fabrikam.test") == []


async def test_graph_split_message_reaches_only_its_envelope(tmp_path: Path, sandbox: Sandbox) -> None:
    """To: names alice (internal, Direct Send route) and partner (external, Graph route): Graph must
    not deliver to alice a second time, so the draft's recipients are set to the envelope."""
    from tests.support import direct_send

    settings = make_settings(
        tmp_path,
        transport=[direct_send(sandbox), graph(sandbox)],
        route=[
            {"name": "internal", "transport": "direct", "recipient_domains": ["contoso.test"]},
            {"name": "external", "transport": "graph"},
        ],
    )
    body = (
        b"From: scanner@contoso.test\r\nTo: alice@contoso.test, partner@example.org\r\n"
        b"Subject: split\r\n\r\nhello\r\n"
    )
    async with running_relay(settings) as relay:
        await send(relay, "scanner@contoso.test", ["alice@contoso.test", "partner@example.org"], body)
        store = sandbox.ctx.store
        await wait_until(
            lambda: (
                len(store.list(folder="Internet")) == 1 and len(store.list(mailbox="alice@contoso.test")) >= 1
            )
        )
        await drained(relay)
        await asyncio.sleep(0.2)
        assert len(store.list(mailbox="alice@contoso.test")) == 1
        [inbox] = store.list(mailbox="alice@contoso.test")
        assert inbox.endpoint == "mx"
        assert store.list(folder="Internet")[0].endpoint == "graph"


async def test_fallback_to_connector_when_graph_is_refused(
    tmp_path: Path, sandbox: Sandbox, monkeypatch: Any
) -> None:
    from tests.support import connector

    monkeypatch.setenv("RELAY365_TEST_APP_SECRET", "revoked-secret")
    cert = sandbox.ctx.tls.issue_client_certificate("relay.contoso.test")
    settings = make_settings(
        tmp_path,
        transport=[graph(sandbox), connector(sandbox, cert)],
        route=[{"name": "external", "transport": "graph", "fallbacks": ["connector"]}],
    )
    async with running_relay(settings) as relay:
        await send(
            relay,
            "scanner@contoso.test",
            ["partner@example.org"],
            b"From: scanner@contoso.test\r\nTo: partner@example.org\r\nSubject: fb\r\n\r\nx\r\n",
        )
        store = sandbox.ctx.store
        await wait_until(lambda: len(store.list(folder="Internet")) == 1)
        assert store.list(folder="Internet")[0].endpoint == "mx"  # arrived through the connector
        await drained(relay)
        assert await relay.spool.list() == []


async def test_graph_without_sent_items_copy_uses_json_sendmail(tmp_path: Path, sandbox: Sandbox) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "scanner@contoso.test", "alice@contoso.test", "no copy"
    msg["X-Scanner-Job"] = "4711"
    msg.set_content("The scan is attached.")
    payload = os.urandom(300 * 1024)
    msg.add_attachment(payload, maintype="application", subtype="pdf", filename="scan.pdf")
    settings = make_settings(tmp_path, transport=[graph(sandbox, save_to_sent_items=False)])
    store = sandbox.ctx.store
    async with running_relay(settings) as relay:
        await send(
            relay,
            "scanner@contoso.test",
            ["alice@contoso.test", "hidden@example.org"],
            msg.as_bytes(policy=email.policy.SMTP),
        )
        await wait_until(lambda: len(store.list(folder="Internet")) == 1)
        await drained(relay)
        assert await relay.spool.list() == []
    assert store.list(folder="SentItems") == []  # the point of the setting
    [inbox] = store.list(mailbox="alice@contoso.test", folder="Inbox")
    [outside] = store.list(folder="Internet")
    assert outside.mailbox == "hidden@example.org"  # the envelope Bcc, as SMTP would deliver it
    for m in (inbox, outside):
        got = message_from_bytes(store.content(m.id), policy=email.policy.default)
        assert isinstance(got, EmailMessage)
        assert got["Subject"] == "no copy" and got["X-Scanner-Job"] == "4711" and got["Bcc"] is None
        [attachment] = got.iter_attachments()
        assert attachment.get_filename() == "scan.pdf" and attachment.get_content() == payload


async def test_graph_sent_items_copy_by_default(tmp_path: Path, sandbox: Sandbox) -> None:
    settings = make_settings(tmp_path, transport=[graph(sandbox)])
    body = b"From: scanner@contoso.test\r\nTo: alice@contoso.test\r\nSubject: copy\r\n\r\nkept\r\n"
    async with running_relay(settings) as relay:
        await send(relay, "scanner@contoso.test", ["alice@contoso.test"], body)
        store = sandbox.ctx.store
        await wait_until(lambda: len(store.list(mailbox="scanner@contoso.test", folder="SentItems")) == 1)
        await drained(relay)
