"""Every reply the sandbox can send is explained by ``relay365 explain`` with the right cause.

The sandbox's replies are found by reading its source (every SMTP reply literal, every Graph error it
raises), so a reply added to the sandbox without a catalogue entry and an expectation here fails this
test. A few of them are then produced over real sockets and the line the client received is explained.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import aiosmtplib
import pytest

import relay365.sandbox
from relay365.diagnostics.explain import explain
from relay365.replies import Category
from relay365.sandbox.http import _graph_code
from relay365.sandbox.runner import Sandbox
from tests.sandbox.sandbox_helpers import ALICE, BOB, SCANNER, app_token, client_tls, message, xoauth2

SANDBOX = Path(relay365.sandbox.__file__).parent
_REPLY = re.compile(r"^[45]\d\d[ -]")

# (text that identifies the reply, catalogue code, category, transient for relay365)
SMTP_EXPECTED: list[tuple[str, str, Category, bool]] = [
    ("452 4.5.3 Too many recipients", "4.5.3", Category.THROTTLING, True),
    ("504 5.7.4 Unrecognized authentication type", "5.7.4", Category.AUTH, True),
    ("550 5.4.1 Recipient address rejected", "5.4.1", Category.RECIPIENT, False),
    ("550 5.7.54 SMTP; Unable to relay", "5.7.54", Category.RELAY, False),
    ("550 5.7.64 TenantAttribution", "5.7.64", Category.RELAY, False),
    ("550 5.7.68 TenantInboundAttribution", "5.7.68", Category.RELAY, False),
    ("552 5.3.4 Message size exceeds", "5.3.4", Category.SIZE, False),
    ("451 4.7.0 Temporary server error", "4.7.0", Category.GENERIC, True),
    ("454 4.7.0 TLS negotiation failed", "4.7.0", Category.TLS, True),
    ("500 5.3.3 Unrecognized command", "5.3.3", Category.PROTOCOL, False),
    ("501 5.1.7 Invalid address", "5.1.7", Category.SENDER, False),
    ("501 5.5.4 Invalid arguments", "5.5.4", Category.PROTOCOL, False),
    ("503 5.5.1 Bad sequence of commands", "5.5.1", Category.PROTOCOL, False),
    ("503 5.5.2 Need mail command", "5.5.2", Category.PROTOCOL, False),
    ("503 5.5.2 Need rcpt command", "5.5.2", Category.PROTOCOL, False),
    ("503 5.5.2 Only one STARTTLS", "5.5.2", Category.PROTOCOL, False),
    ("503 5.5.2 Send hello first", "5.5.2", Category.PROTOCOL, False),
    ("503 5.5.2 Sender already specified", "5.5.2", Category.PROTOCOL, False),
    ("503 5.5.2 Already authenticated", "5.5.2", Category.PROTOCOL, False),
    ("501 5.5.2 Cannot Base64-decode", "5.5.2", Category.PROTOCOL, False),
    ("432 4.3.2 Concurrent connections limit exceeded", "4.3.2", Category.THROTTLING, True),
    ("530 5.7.57 Client not authenticated", "5.7.57", Category.AUTH, True),
    ("disabled for the Mailbox", "5.7.139", Category.AUTH, True),
    ("disabled for the Tenant", "5.7.139", Category.AUTH, True),
    ("security defaults policy", "5.7.139", Category.AUTH, True),
    ("535 5.7.3 Authentication unsuccessful", "5.7.3", Category.AUTH, True),
    ("550 5.7.30 Basic authentication", "5.7.30", Category.AUTH, True),
    ("550 5.7.60 SMTP; Client does not have permissions", "5.7.60", Category.SENDER, False),
    ("InvalidLicenseException", "5.2.0", Category.AUTH, True),
    ("SubmissionQuotaExceededException", "5.2.0", Category.THROTTLING, True),
    ("554 5.2.252 SendAsDenied", "5.2.0", Category.SENDER, False),
    ("550 5.1.90", "5.1.90", Category.THROTTLING, True),  # Graph over the daily recipients: the NDR
    ("550 5.7.1 Delivery not authorized", "5.7.1", Category.SENDER, False),  # a mail flow rule's NDR
]


def _sandbox_source() -> list[ast.AST]:
    return [ast.parse(path.read_text()) for path in sorted(SANDBOX.glob("*.py"))]


def sandbox_smtp_replies() -> set[str]:
    """Every 4yz/5yz reply literal in the sandbox (f-string holes become 'x'); aiosmtpd's own texts
    that the sandbox translates (the keys of its translation table, a regex) are not sent."""
    found: set[str] = set()
    for tree in _sandbox_source():
        skipped = {
            id(key)
            for node in ast.walk(tree)
            if isinstance(node, ast.Dict)
            for key in node.keys
            if key is not None
        }
        skipped |= {
            id(arg)
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("compile", "fullmatch")
            for arg in node.args
        }
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _REPLY.match(node.value):
                found.add(node.value)
            elif isinstance(node, ast.JoinedStr) and node.values:
                first = node.values[0]
                if isinstance(first, ast.Constant) and _REPLY.match(str(first.value)):
                    parts = (str(v.value) if isinstance(v, ast.Constant) else "x" for v in node.values)
                    found.add("".join(parts))
    return found


def sandbox_graph_errors() -> set[tuple[int, str]]:
    """Every (status, error code) the sandbox's Graph endpoints raise, and those of injected faults."""
    found = {(status, _graph_code(status)) for status in (400, 401, 403, 404, 429, 500, 502, 503, 504)}
    for tree in _sandbox_source():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or len(node.args) < 2:
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            status, code = node.args[0], node.args[1]
            constants = isinstance(status, ast.Constant) and isinstance(code, ast.Constant)
            if name in ("GraphError", "graph_error") and constants:
                found.add((int(status.value), str(code.value)))
    return found


def test_every_smtp_reply_of_the_sandbox_is_explained() -> None:
    replies = sandbox_smtp_replies()
    assert len(replies) >= 30
    for reply in sorted(replies):
        expected = [e for e in SMTP_EXPECTED if e[0] in reply]
        assert expected, f"the sandbox sends {reply!r}: add it to SMTP_EXPECTED and the catalogue"
        _, code, category, transient = max(expected, key=lambda e: len(e[0]))
        explanation = explain(reply)
        assert explanation.entry is not None, reply
        assert (explanation.entry.code, explanation.entry.category) == (code, category), reply
        assert explanation.transient is transient, reply
        assert explanation.entry.source.startswith("https://")


def test_every_graph_error_of_the_sandbox_is_explained() -> None:
    errors = sandbox_graph_errors()
    assert len(errors) >= 20
    for status, code in sorted(errors):
        explanation = explain(f"{status} {code}: message")
        assert explanation.entry is not None, code
        assert (explanation.entry.code, explanation.entry.reply_code) == (code, status)
        assert explanation.entry.source.startswith("https://")


async def _session(sandbox: Sandbox) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sandbox.submission_port, start_tls=False, timeout=10)
    await client.connect()
    await client.ehlo(hostname="scanner.lan")
    await client.starttls(tls_context=client_tls(sandbox))
    await client.ehlo(hostname="scanner.lan")
    reply = await client.execute_command(b"AUTH", b"XOAUTH2", xoauth2(SCANNER, app_token(sandbox)).encode())
    assert reply.code == 235
    return client


@pytest.mark.timeout(60)
async def test_replies_received_over_smtp_are_explained(sandbox: Sandbox) -> None:
    """The lines a scanner actually receives: a From: it may not use, a fourth concurrent sender."""
    client = await _session(sandbox)
    with pytest.raises(aiosmtplib.SMTPDataError) as header:
        await client.sendmail(SCANNER, [BOB], message(ALICE, BOB).as_bytes())
    send_as = explain(f"{header.value.code} {header.value.message}")
    assert send_as.entry is not None and send_as.entry.category is Category.SENDER
    assert "Add-RecipientPermission" in send_as.entry.fix and not send_as.transient
    clients = [client] + [await _session(sandbox) for _ in range(3)]
    for c in clients[:3]:
        await c.mail(SCANNER)  # three senders hold the mailbox's three slots
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as fourth:
        await clients[3].mail(SCANNER)
    busy = explain(f"{fourth.value.code} {fourth.value.message}")
    assert busy.entry is not None and busy.entry.category is Category.THROTTLING and busy.transient
    for c in clients:
        c.close()
