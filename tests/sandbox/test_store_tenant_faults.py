"""The mail store, the tenant file, faults and the clock: the sandbox's plain data parts."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from relay365.errors import ConfigError
from relay365.sandbox.clock import Clock, ManualClock
from relay365.sandbox.faults import Fault, FaultError, Faults
from relay365.sandbox.runner import Sandbox
from relay365.sandbox.store import MailStore, MessageNotFound
from relay365.sandbox.tenant import EXAMPLE_TENANT_PATH, example_tenant, load_tenant
from tests.sandbox.sandbox_helpers import ALICE, EXTERNAL, SCANNER, make_tenant

RAW = (
    b"From: Scanner <scanner@contoso.test>\r\nTo: alice@contoso.test\r\n"
    b"Subject: =?utf-8?q?Sc=C3=A4n?=\r\n the second line\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n"
)


def test_store_files_each_copy_and_reads_it_back(tmp_path: Path) -> None:
    clock = Clock()
    store = MailStore(tmp_path, clock=clock)
    stored = store.deliver_accepted(
        tenant=make_tenant(),
        endpoint="submission",
        mail_from=SCANNER,
        rcpt_tos=[ALICE, EXTERNAL, ALICE.upper()],
        authenticated_as=SCANNER,
        content=RAW,
        sender_mailbox_for_sent_items=SCANNER,
    )
    assert [(m.folder, m.mailbox) for m in stored] == [
        ("Inbox", ALICE),
        ("Internet", EXTERNAL),
        ("SentItems", SCANNER),
    ]
    inbox = stored[0]
    assert inbox.subject == "Scän the second line"
    assert inbox.header("message-id") == "<1@x>"
    assert inbox.size == len(RAW)
    assert store.content(inbox.id) == RAW
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".eml"] * 3 + [".json"] * 3
    # Another store on the same directory (the CLI while the sandbox runs) sees the same messages.
    other = MailStore(tmp_path)
    assert [m.id for m in other.list()] == [m.id for m in stored]
    assert other.get(inbox.id) == inbox
    assert [m.id for m in other.list(mailbox=ALICE.upper(), folder="Inbox")] == [inbox.id]
    with pytest.raises(MessageNotFound):
        other.get("../etc/passwd")


def test_copies_stored_in_one_millisecond_list_in_the_order_they_were_stored(tmp_path: Path) -> None:
    """Ids sort by millisecond, then by the store's sequence: with a clock that stands still every
    copy has the same millisecond, and ``list`` (oldest first) is still the order of storing; with a
    random part alone it was any order (seen: the copies of one delivery listed out of order)."""
    store = MailStore(tmp_path, clock=ManualClock(start=1_800_000_000.0))
    added = [
        store.add(
            folder="Inbox",
            mailbox=ALICE,
            endpoint="mx",
            mail_from=SCANNER,
            rcpt_tos=[ALICE],
            authenticated_as=None,
            content=RAW.replace(b"<1@x>", f"<{n}@x>".encode()),
        ).id
        for n in range(200)
    ]
    assert [m.id for m in store.list()] == added
    assert [m.id for m in MailStore(tmp_path).list()] == added


def test_rejection_counters_are_thread_safe_and_persisted(tmp_path: Path) -> None:
    store = MailStore(tmp_path)
    threads = [
        threading.Thread(target=lambda: [store.count_rejection("submission", "432 4.3.2") for _ in range(50)])
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    store.count_rejection("mx", "550 5.7.64")
    assert store.rejections() == {"submission 432 4.3.2": 200, "mx 550 5.7.64": 1}
    assert MailStore(tmp_path).rejections() == store.rejections()
    assert json.loads((tmp_path / "rejections.json").read_text())["submission 432 4.3.2"] == 200


async def test_mailboxes_and_ca_survive_a_restart(tmp_path: Path) -> None:
    async with Sandbox(make_tenant(), state_dir=tmp_path, serve_http=False) as first:
        first.ctx.store.add(
            folder="Inbox", mailbox=ALICE, endpoint="mx", mail_from=SCANNER, rcpt_tos=[ALICE],
            authenticated_as=None, content=RAW,
        )  # fmt: skip
        ca = first.ca_path.read_bytes()
    async with Sandbox(make_tenant(), state_dir=tmp_path, serve_http=False) as second:
        assert [m.subject for m in second.ctx.store.list(mailbox=ALICE)] == ["Scän the second line"]
        assert second.ca_path.read_bytes() == ca


def test_example_tenant_loads_with_documented_defaults() -> None:
    tenant = example_tenant()
    assert tenant.accepted_domains == ("contoso.test", "fabrikam.test")
    assert not tenant.basic_auth_allowed and not tenant.reject_direct_send
    assert tenant.limits.messages_per_minute == 30
    assert tenant.limits.recipients_per_day == 10000
    assert tenant.limits.smtp_connections_per_mailbox == 3
    assert tenant.limits.max_message_size == 35 * 1024 * 1024
    scanner = tenant.mailbox("Scanner@Contoso.Test")
    assert scanner is not None and "noreply@contoso.test" in scanner.send_as
    bob = tenant.mailbox("bob@fabrikam.test")
    assert bob is not None and not tenant.smtp_auth_enabled_for(bob)
    assert tenant.smtp_auth_enabled_for(scanner)
    assert {c.name for c in tenant.connectors} == {"Office printers", "Relay certificate"}


@pytest.mark.parametrize(
    ("replace", "key", "value"),
    [
        ("messages_per_minute = 30", "limits.messages_per_minute", "thirty"),
        ('host = "127.0.0.1"', "host", "192.0.2.1"),
        ("basic_auth_allowed = false", "basic_auth_allowed", 1),
        ('address = "alice@contoso.test"', "mailbox[2].address", "alice@elsewhere.test"),
        ('permissions = ["SMTP.Send"]', "app[1].permissions", "Mail.Everything"),
        ('sender_ip_ranges = ["198.51.100.7/32"]', "connector[0].sender_ip_ranges", "not-an-ip"),
    ],
)
def test_tenant_errors_name_the_key_and_the_value(
    tmp_path: Path, replace: str, key: str, value: object
) -> None:
    text = EXAMPLE_TENANT_PATH.read_text()
    assert replace in text
    bad = {
        "limits.messages_per_minute": 'messages_per_minute = "thirty"',
        "host": 'host = "192.0.2.1"',
        "basic_auth_allowed": "basic_auth_allowed = 1",
        "mailbox[2].address": 'address = "alice@elsewhere.test"',
        "app[1].permissions": 'permissions = ["Mail.Everything"]',
        "connector[0].sender_ip_ranges": 'sender_ip_ranges = ["not-an-ip"]',
    }[key]
    path = tmp_path / "tenant.toml"
    path.write_text(text.replace(replace, bad, 1))
    with pytest.raises(ConfigError) as error:
        load_tenant(path)
    assert (error.value.key, error.value.value) == (key, value)
    assert f"Config '{key}' has value {value!r}." in str(error.value)


def test_faults_are_taken_in_order_and_counted_down() -> None:
    faults = Faults()
    faults.add(Fault(endpoint="mx", stage="rcpt", reply="450 4.7.500 later", times=2))
    faults.add(Fault(endpoint="mx", stage="rcpt", action="drop"))
    faults.add(Fault(endpoint="graph", stage="request", reply="503", headers={"Retry-After": "2"}))
    assert faults.take("submission", "rcpt") is None
    taken = [faults.take("mx", "rcpt") for _ in range(4)]
    assert [f.action if f else None for f in taken] == ["reply", "reply", "drop", None]
    graph = faults.take("graph", "request")
    assert graph is not None and graph.headers["Retry-After"] == "2"
    faults.add(Fault(endpoint="submission", stage="auth", action="stall", stall_seconds=1))
    faults.clear()
    assert faults.pending() == []
    for bad in (
        {"endpoint": "imap", "stage": "rcpt", "reply": "x"},
        {"endpoint": "mx", "stage": "request", "reply": "x"},
        {"endpoint": "mx", "stage": "rcpt", "action": "reply"},
        {"endpoint": "mx", "stage": "rcpt", "action": "explode"},
        {"endpoint": "mx", "stage": "rcpt", "reply": "x", "times": 0},
    ):
        with pytest.raises(FaultError):
            Fault(**bad)  # type: ignore[arg-type]


def test_clock_moves_only_forward() -> None:
    clock = Clock()
    before = clock.now()
    clock.advance(3600)
    assert clock.now() - before >= 3600
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_app_certificate_file_is_read_next_to_the_tenant_file(tmp_path: Path) -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    (tmp_path / "app.pem").write_text(pem)
    text = EXAMPLE_TENANT_PATH.read_text().replace(
        'client_secret = "sandbox-secret-relay365"', 'certificate_file = "app.pem"'
    )
    (tmp_path / "tenant.toml").write_text(text)
    tenant = load_tenant(tmp_path / "tenant.toml")
    app = tenant.apps["11111111-2222-3333-4444-555555555555"]
    assert (app.certificate_pem, app.client_secret) == (pem, None)
    (tmp_path / "app.pem").unlink()
    with pytest.raises(ConfigError) as error:
        load_tenant(tmp_path / "tenant.toml")
    assert error.value.key == "app[0].certificate_file"
