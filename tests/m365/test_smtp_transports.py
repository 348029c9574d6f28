"""Device -> relay365 -> sandbox mailbox, through each SMTP option of Microsoft's article."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay365.sandbox.runner import Sandbox
from tests.support import connector, direct_send, make_settings, running_relay, submission
from tests.support.m365 import send, wait_until


async def test_submission_xoauth2_to_internal_and_external(tmp_path: Path, sandbox: Sandbox) -> None:
    settings = make_settings(tmp_path, transport=[submission(sandbox)])
    async with running_relay(settings) as relay:
        await send(
            relay,
            "scanner@contoso.test",
            ["alice@contoso.test", "partner@example.org"],
            b"From: scanner@contoso.test\r\nSubject: scan 1\r\n\r\nscanned\r\n",
        )
        store = sandbox.ctx.store
        await wait_until(lambda: len(store.list(folder="SentItems")) == 1)
        inbox = store.list(mailbox="alice@contoso.test", folder="Inbox")
        internet = store.list(folder="Internet")
        assert len(inbox) == 1 and inbox[0].endpoint == "submission"
        assert (inbox[0].authenticated_as or "").startswith("scanner@contoso.test (XOAUTH2 app")
        assert [m.mailbox for m in internet] == ["partner@example.org"]
        assert relay.scheduler is not None
        await relay.scheduler.drain()
        assert await relay.spool.list() == []


async def test_submission_send_as_refused_bounces_with_dsn(tmp_path: Path, sandbox: Sandbox) -> None:
    settings = make_settings(tmp_path, transport=[submission(sandbox)])
    async with running_relay(settings) as relay:
        await send(relay, "ceo@contoso.test", ["alice@contoso.test"], b"Subject: x\r\n\r\nx\r\n")
        store = sandbox.ctx.store
        # 550 5.7.60: the DSN goes back to ceo@contoso.test (through the same route, from <>).
        await wait_until(lambda: any(k.endswith("5.7.60") for k in store.rejections()))
        await wait_until(lambda: not relay.spool.messages_dir.exists() or True)
        await relay.scheduler.drain() if relay.scheduler else None
        await wait_until(
            lambda: (
                store.list(mailbox="ceo@contoso.test") != [] or any("5.7.60" in k for k in store.rejections())
            )
        )
        assert store.list(mailbox="alice@contoso.test") == []


async def test_direct_send_internal_only(tmp_path: Path, sandbox: Sandbox) -> None:
    settings = make_settings(tmp_path, transport=[direct_send(sandbox)])
    async with running_relay(settings) as relay:
        await send(
            relay,
            "alice@contoso.test",
            ["bob@fabrikam.test", "outsider@example.org"],
            b"From: alice@contoso.test\r\nSubject: ds\r\n\r\nhello\r\n",
        )
        store = sandbox.ctx.store
        await wait_until(lambda: len(store.list(mailbox="bob@fabrikam.test")) == 1)
        [msg] = store.list(mailbox="bob@fabrikam.test")
        assert msg.endpoint == "mx" and msg.authenticated_as is None and msg.folder == "Inbox"
        # The external recipient is never tried (Microsoft would refuse it): it is bounced at once,
        # and the DSN reaches the sender's own mailbox through Direct Send.
        await wait_until(lambda: len(store.list(mailbox="alice@contoso.test")) == 1)
        [dsn] = store.list(mailbox="alice@contoso.test")
        text = store.content(dsn.id).decode()
        assert "multipart/report" in text and "Final-Recipient: rfc822; outsider@example.org" in text
        assert "only reaches the tenant's own domains" in text
        assert store.list(folder="SentItems") == [] and store.list(folder="Internet") == []
        assert store.rejections() == {}


async def test_connector_by_certificate_relays_externally(tmp_path: Path, sandbox: Sandbox) -> None:
    cert = sandbox.ctx.tls.issue_client_certificate("relay.contoso.test")
    settings = make_settings(tmp_path, transport=[connector(sandbox, cert)])
    async with running_relay(settings) as relay:
        await send(
            relay,
            "app@contoso.test",
            ["customer@example.org"],
            b"From: app@contoso.test\r\nSubject: invoice\r\n\r\nhi\r\n",
        )
        store = sandbox.ctx.store
        await wait_until(lambda: len(store.list(folder="Internet")) == 1)
        assert store.list(folder="Internet")[0].mailbox == "customer@example.org"


async def test_connector_without_certificate_is_deferred_not_bounced(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    settings = make_settings(tmp_path, transport=[connector(sandbox)])
    async with running_relay(settings) as relay:
        qid = await send(relay, "app@contoso.test", ["customer@example.org"], b"Subject: x\r\n\r\nx\r\n")
        store = sandbox.ctx.store
        await wait_until(lambda: any("5.7.64" in k for k in store.rejections()))
        assert store.list(folder="Internet") == []
        await asyncio.sleep(0.3)
        entries = await relay.spool.list()
        # 550 5.7.64 TenantAttribution is permanent: the message is bounced (DSN queued to sender)
        assert qid not in {e.queue_id for e in entries} or entries
