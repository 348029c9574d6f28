"""The MX endpoint (mail.protection.outlook.com role): Direct Send, connector relay, RejectDirectSend."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import smtplib
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from relay365.sandbox.faults import Fault
from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import InboundConnector
from tests.sandbox.sandbox_helpers import (
    ALICE,
    CERT_NAME,
    EXTERNAL,
    SCANNER,
    client_tls,
    in_thread,
    message,
    smtplib_session,
    swaks,
)

pytestmark = pytest.mark.timeout(60)

LOOPBACK_CONNECTOR = InboundConnector(
    name="loopback office", sender_ip_ranges=(ipaddress.ip_network("127.0.0.1/32"),)
)


async def mx_client(
    sandbox: Sandbox, *, starttls: bool = False, cert: tuple[Path, Path] | None = None
) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sandbox.mx_port, start_tls=False, timeout=10)
    await client.connect()
    await client.ehlo(hostname="mfp.contoso.test")
    if starttls:
        tls = client_tls(sandbox)
        if cert is not None:
            tls.load_cert_chain(*cert)
        await client.starttls(tls_context=tls)
        await client.ehlo(hostname="mfp.contoso.test")
    return client


async def test_banner_ehlo_and_no_auth(sandbox: Sandbox) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sandbox.mx_port, start_tls=False, timeout=10)
    greeting = await client.connect()
    assert re.fullmatch(
        r"\S+\.mail\.protection\.outlook\.com Microsoft ESMTP MAIL Service ready at "
        r"\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d \+0000",
        greeting.message,
    ), greeting.message
    ehlo = await client.ehlo(hostname="mfp.contoso.test")
    assert ehlo.message.splitlines()[1:] == [
        "SIZE 157286400", "PIPELINING", "DSN", "ENHANCEDSTATUSCODES", "STARTTLS",
        "8BITMIME", "BINARYMIME", "CHUNKING", "SMTPUTF8",
    ]  # fmt: skip
    await client.starttls(tls_context=client_tls(sandbox))
    ehlo = await client.ehlo(hostname="mfp.contoso.test")
    assert "STARTTLS" not in ehlo.message and "AUTH" not in ehlo.message
    response = await client.execute_command(b"AUTH", b"LOGIN")
    assert (response.code, response.message) == (504, "5.7.4 Unrecognized authentication type")
    await client.quit()


async def test_direct_send_to_internal_mailbox_with_smtplib(sandbox: Sandbox) -> None:
    client = await in_thread(smtplib_session, sandbox.mx_port, False)
    try:
        code, reply = await in_thread(client.mail, SCANNER)
        assert (code, reply) == (250, b"2.1.0 Sender OK")
        code, reply = await in_thread(client.rcpt, ALICE)
        assert (code, reply) == (250, b"2.1.5 Recipient OK")
        code, reply = await in_thread(client.data, message(SCANNER, ALICE, "Direct").as_bytes())
        assert code == 250
        assert re.fullmatch(
            rb"2\.6\.0 <\S+> \[InternalId=\S+, Hostname=\S+\] Queued mail for delivery", reply
        )
    finally:
        await in_thread(client.quit)
    (stored,) = sandbox.ctx.store.list()
    assert (stored.folder, stored.mailbox, stored.endpoint) == ("Inbox", ALICE, "mx")
    assert stored.authenticated_as is None
    assert stored.subject == "Direct"


async def test_direct_send_refusals(sandbox: Sandbox) -> None:
    client = await mx_client(sandbox)
    await client.mail("printer@example.org")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as unknown:
        await client.rcpt("nobody@contoso.test")
    assert unknown.value.code == 550
    assert re.fullmatch(r"5\.4\.1 Recipient address rejected: Access denied\. \[\S+\]", unknown.value.message)
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as relay:
        await client.rcpt(EXTERNAL)
    assert (relay.value.code, relay.value.message) == (
        550,
        "5.7.54 SMTP; Unable to relay recipient in non-accepted domain",
    )
    await client.rset()
    # An accepted-domain sender in a tenant with connectors, from an address no connector lists.
    await client.mail(SCANNER)
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as attribution:
        await client.rcpt(EXTERNAL)
    assert attribution.value.code == 550
    assert re.fullmatch(r"5\.7\.64 TenantAttribution; Relay Access Denied \[\S+\]", attribution.value.message)
    await client.quit()
    assert sandbox.ctx.store.rejections() == {"mx 550 5.4.1": 1, "mx 550 5.7.54": 1, "mx 550 5.7.64": 1}
    assert sandbox.ctx.store.list() == []


async def test_connector_relay_by_source_ip(start_sandbox: Any) -> None:
    sandbox: Sandbox = await start_sandbox(connectors=(LOOPBACK_CONNECTOR,))
    client = await mx_client(sandbox, starttls=True)
    errors, _ = await client.sendmail(SCANNER, [EXTERNAL, ALICE], message(SCANNER, EXTERNAL).as_bytes())
    assert errors == {}
    await client.quit()
    internet = sandbox.ctx.store.list(folder="Internet")
    assert [(m.mailbox, m.authenticated_as) for m in internet] == [(EXTERNAL, "connector:loopback office")]
    assert len(sandbox.ctx.store.list(mailbox=ALICE, folder="Inbox")) == 1
    assert sandbox.ctx.store.list(folder="SentItems") == []


async def test_connector_relay_by_certificate_with_swaks(sandbox: Sandbox) -> None:
    cert, key = sandbox.ctx.tls.issue_client_certificate(CERT_NAME)
    code, transcript = await swaks(
        "--server", f"127.0.0.1:{sandbox.mx_port}",
        "--tls", "--tls-verify", "--tls-ca-path", str(sandbox.ca_path),
        "--tls-cert", str(cert), "--tls-key", str(key),
        "--from", "app@contoso.test", "--to", EXTERNAL, "--header", "Subject: relayed",
    )  # fmt: skip
    assert code == 0, transcript
    assert "Queued mail for delivery" in transcript
    (stored,) = sandbox.ctx.store.list(folder="Internet")
    assert (stored.mailbox, stored.subject, stored.authenticated_as) == (
        EXTERNAL,
        "relayed",
        "connector:relay cert",
    )


async def test_certificate_without_connector_is_5_7_64(sandbox: Sandbox, tmp_path: Path) -> None:
    cert = sandbox.ctx.tls.issue_client_certificate("other.contoso.test")
    client = await mx_client(sandbox, starttls=True, cert=cert)
    await client.mail("app@example.org")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
        await client.rcpt(EXTERNAL)
    assert refused.value.code == 550
    assert refused.value.message.startswith("5.7.64 TenantAttribution; Relay Access Denied")
    await client.quit()


async def test_untrusted_certificate_proceeds_and_relay_is_5_7_64(sandbox: Sandbox, tmp_path: Path) -> None:
    """As Exchange Online: an untrusted client certificate does not fail the handshake; it attributes
    nothing, so relaying is refused with 5.7.64 (KB 3212877) while Direct Send still works."""
    leaf = trustme.CA().issue_cert(CERT_NAME)
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    code, transcript = await swaks(
        "--server", f"127.0.0.1:{sandbox.mx_port}", "--tls", "--tls-cert", str(cert), "--tls-key", str(key),
        "--from", "app@contoso.test", "--to", EXTERNAL,
    )  # fmt: skip
    assert code != 0, transcript
    assert " ~> RCPT TO:" in transcript  # swaks marks commands sent over TLS with ~
    assert "550 5.7.64 TenantAttribution; Relay Access Denied" in transcript
    assert sandbox.ctx.store.list() == []
    assert sandbox.ctx.store.rejections() == {"mx 550 5.7.64": 1}
    client = await mx_client(sandbox, starttls=True, cert=(cert, key))
    await client.mail("app@contoso.test")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
        await client.rcpt(EXTERNAL)
    assert refused.value.code == 550 and refused.value.message.startswith("5.7.64")
    await client.rset()
    errors, _ = await client.sendmail(
        "app@contoso.test", [ALICE], message("app@contoso.test", ALICE).as_bytes()
    )
    assert errors == {}
    await client.quit()
    (stored,) = sandbox.ctx.store.list(mailbox=ALICE)
    assert stored.authenticated_as is None  # anonymous Direct Send, not the connector


async def test_incomplete_certificate_chain_is_5_7_64(sandbox: Sandbox, tmp_path: Path) -> None:
    """A leaf issued by an intermediate CA, sent without the intermediate: the chain does not reach
    the trusted root (KB 3212877's cause). With the intermediate, the connector matches."""
    leaf = sandbox.ctx.tls.ca.create_child_ca().issue_cert(CERT_NAME)
    key = tmp_path / "k.pem"
    leaf.private_key_pem.write_to_path(str(key))
    alone, full = tmp_path / "leaf.pem", tmp_path / "chain.pem"
    leaf.cert_chain_pems[0].write_to_path(str(alone))
    full.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    client = await mx_client(sandbox, starttls=True, cert=(alone, key))
    await client.mail("app@contoso.test")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
        await client.rcpt(EXTERNAL)
    assert refused.value.message.startswith("5.7.64")
    await client.quit()
    client = await mx_client(sandbox, starttls=True, cert=(full, key))
    errors, _ = await client.sendmail(
        "app@contoso.test", [EXTERNAL], message("app@contoso.test", EXTERNAL).as_bytes()
    )
    assert errors == {}
    await client.quit()
    (relayed,) = sandbox.ctx.store.list(folder="Internet")
    assert relayed.authenticated_as == "connector:relay cert"


async def test_reject_direct_send(start_sandbox: Any) -> None:
    sandbox: Sandbox = await start_sandbox(reject_direct_send=True)
    client = await mx_client(sandbox)
    await client.mail(SCANNER)
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
        await client.rcpt(ALICE)
    assert refused.value.code == 550
    assert refused.value.message.startswith(
        "5.7.68 TenantInboundAttribution; Direct Send not allowed for this organization from "
        "unauthorized sources"
    )
    await client.rset()
    # Mail from outside the organisation is ordinary inbound mail and still accepted.
    errors, _ = await client.sendmail(
        "partner@example.org", [ALICE], message("partner@example.org", ALICE).as_bytes()
    )
    assert errors == {}
    await client.quit()
    # A partner connector (certificate) lets the organisation's own senders through again.
    cert = sandbox.ctx.tls.issue_client_certificate(CERT_NAME)
    client = await mx_client(sandbox, starttls=True, cert=cert)
    errors, _ = await client.sendmail(SCANNER, [ALICE], message(SCANNER, ALICE).as_bytes())
    assert errors == {}
    await client.quit()
    assert sandbox.ctx.store.rejections() == {"mx 550 5.7.68": 1}
    assert len(sandbox.ctx.store.list(mailbox=ALICE)) == 2


async def test_mx_faults(sandbox: Sandbox) -> None:
    sandbox.ctx.faults.add(
        Fault(endpoint="mx", stage="rcpt", reply="450 4.7.500 Access denied, please try again later")
    )
    sandbox.ctx.faults.add(Fault(endpoint="mx", stage="after_data", action="drop"))
    client = await mx_client(sandbox)
    await client.mail(SCANNER)
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
        await client.rcpt(ALICE)
    assert refused.value.code == 450
    assert (await client.rcpt(ALICE)).code == 250
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await client.data(message(SCANNER, ALICE).as_bytes())
    client.close()
    assert sandbox.ctx.store.list() == []
    assert sandbox.ctx.store.rejections() == {"mx 450 4.7.500": 1, "mx drop after_data": 1}


async def test_smtplib_starttls_direct_send(sandbox: Sandbox) -> None:
    client = await in_thread(smtplib_session, sandbox.mx_port, True, client_tls(sandbox))
    try:
        refused = await in_thread(client.sendmail, SCANNER, [ALICE], message(SCANNER, ALICE).as_bytes())
        assert refused == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            await in_thread(
                client.sendmail, "x@example.org", [EXTERNAL], message("x@example.org", EXTERNAL).as_bytes()
            )
    finally:
        await in_thread(client.quit)
    assert len(sandbox.ctx.store.list(mailbox=ALICE)) == 1


async def _command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> list[bytes]:
    writer.write(data)
    await writer.drain()
    lines = [await reader.readline()]
    while lines[-1][3:4] == b"-":
        lines.append(await reader.readline())
    return lines


async def test_bdat_chunking_and_binarymime(sandbox: Sandbox) -> None:
    """RFC 3030: the CHUNKING and BINARYMIME Exchange advertises, with a raw client."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sandbox.mx_port)
    try:
        async with asyncio.timeout(10):
            assert (await reader.readline()).startswith(b"220 ")
            ehlo = await _command(reader, writer, b"EHLO raw.contoso.test\r\n")
            assert b"250-CHUNKING\r\n" in ehlo and b"250-BINARYMIME\r\n" in ehlo
            assert await _command(reader, writer, b"BDAT 4\r\nabcd") == [
                b"503 5.5.1 Bad sequence of commands\r\n"
            ]
            mail = f"MAIL FROM:<{SCANNER}> BODY=BINARYMIME\r\n".encode()
            assert await _command(reader, writer, mail) == [b"250 2.1.0 Sender OK\r\n"]
            assert await _command(reader, writer, f"RCPT TO:<{ALICE}>\r\n".encode()) == [
                b"250 2.1.5 Recipient OK\r\n"
            ]
            assert (await _command(reader, writer, b"DATA\r\n"))[0].startswith(b"503 5.5.1")
            body = (
                message(SCANNER, ALICE, "Chunked").as_bytes().replace(b"\n", b"\r\n") + b"\x00\xff binary\r\n"
            )
            first, second = body[:50], body[50:]
            reply = await _command(reader, writer, b"BDAT %d\r\n" % len(first) + first)
            assert reply == [b"250 2.0.0 BDAT 50 octets received\r\n"]
            reply = await _command(reader, writer, b"BDAT %d LAST\r\n" % len(second) + second)
            assert reply[0].startswith(b"250 2.6.0 ") and reply[0].endswith(b"Queued mail for delivery\r\n")
            assert await _command(reader, writer, b"QUIT\r\n") == [
                b"221 2.0.0 Service closing transmission channel\r\n"
            ]
    finally:
        writer.close()
        await writer.wait_closed()
    (stored,) = sandbox.ctx.store.list(mailbox=ALICE)
    # The bytes as received, after the header fields Exchange Online Protection stamps on inbound mail.
    stamped, received = sandbox.ctx.store.content(stored.id).split(b"\r\nFrom: ", 1)
    assert b"From: " + received == body
    assert stamped.startswith(b"Authentication-Results: spf=pass (sender IP is 127.0.0.1)")
    assert b"\r\nX-MS-Exchange-Organization-SCL: 1\r\n" in stamped
    assert stored.subject == "Chunked"


async def test_exchange_session_texts(sandbox: Sandbox) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sandbox.mx_port, start_tls=False, timeout=10)
    await client.connect()
    replies = [
        await client.execute_command(b"MAIL", b"FROM:<" + SCANNER.encode() + b">"),
        await client.execute_command(b"HELO", b"old.contoso.test"),
        await client.execute_command(b"RCPT", b"TO:<" + ALICE.encode() + b">"),
        await client.execute_command(b"MAIL", b"FROM:<" + SCANNER.encode() + b">"),
        await client.execute_command(b"MAIL", b"FROM:<" + SCANNER.encode() + b">"),
        await client.execute_command(b"DATA"),
        await client.execute_command(b"XYZZY"),
        await client.execute_command(b"NOOP"),
        await client.execute_command(b"RCPT", b"TO:<" + ALICE.encode() + b">"),
        await client.execute_command(b"DATA"),
    ]
    assert [(r.code, r.message) for r in replies] == [
        (503, "5.5.2 Send hello first"),
        (250, f"{replies[1].message.split()[0]} Hello [127.0.0.1]"),
        (503, "5.5.2 Need mail command"),
        (250, "2.1.0 Sender OK"),
        (503, "5.5.2 Sender already specified"),
        (503, "5.5.2 Need rcpt command"),
        (500, "5.3.3 Unrecognized command 'XYZZY'"),
        (250, "2.0.0 OK"),
        (250, "2.1.5 Recipient OK"),
        (354, "Start mail input; end with <CRLF>.<CRLF>"),
    ]
    assert replies[1].message.split()[0].endswith(".mail.protection.outlook.com")
    client.close()


async def test_receive_size_limit(start_sandbox: Any) -> None:
    sandbox: Sandbox = await start_sandbox(limits={"max_receive_message_size": 1024})
    client = await mx_client(sandbox)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as announced:
        await client.sendmail(SCANNER, [ALICE], message(SCANNER, ALICE, body="x" * 2000).as_bytes())
    assert (announced.value.code, announced.value.message) == (
        552,
        "5.3.4 Message size exceeds fixed maximum message size",
    )
    await client.quit()
    assert sandbox.ctx.store.rejections() == {"mx 552 5.3.4": 1}
