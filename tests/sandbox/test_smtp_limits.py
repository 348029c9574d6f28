"""Submission limits (concurrency, per-minute, per-day, size, recipients) and injected faults."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiosmtplib
import pytest

from relay365.sandbox.faults import Fault
from relay365.sandbox.runner import Sandbox
from tests.sandbox.sandbox_helpers import (
    ALICE,
    BOB,
    EXTERNAL,
    SCANNER,
    app_token,
    client_tls,
    message,
    xoauth2,
)

pytestmark = pytest.mark.timeout(60)


async def login(sandbox: Sandbox, user: str = SCANNER) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sandbox.submission_port, start_tls=False, timeout=10)
    await client.connect()
    await client.ehlo(hostname="printer.lan")
    await client.starttls(tls_context=client_tls(sandbox))
    await client.ehlo(hostname="printer.lan")
    response = await client.execute_command(b"AUTH", b"XOAUTH2", xoauth2(user, app_token(sandbox)).encode())
    assert response.code == 235, response
    return client


async def test_fourth_connection_of_a_mailbox_gets_432_4_3_2(start_sandbox: Any) -> None:
    sandbox: Sandbox = await start_sandbox(limits={"smtp_connections_per_mailbox": 3})
    clients = [await login(sandbox) for _ in range(4)]
    for client in clients[:3]:
        assert (await client.mail(SCANNER)).code == 250
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await clients[3].mail(SCANNER)
    assert refused.value.code == 432
    assert refused.value.message.startswith("4.3.2 Concurrent connections limit exceeded.")
    # Another mailbox is not affected; a freed slot lets the fourth connection send.
    other = await login(sandbox, ALICE)
    assert (await other.mail(ALICE)).code == 250
    await clients[0].quit()
    await asyncio.sleep(0.05)
    errors, _ = await clients[3].sendmail(SCANNER, [ALICE], message(SCANNER, ALICE).as_bytes())
    assert errors == {}
    for client in [*clients[1:], other]:
        await client.quit()
    assert sandbox.ctx.store.rejections() == {"submission 432 4.3.2": 1}


async def test_per_minute_excess_is_accepted_and_counted_as_throttled(start_sandbox: Any) -> None:
    sandbox: Sandbox = await start_sandbox(limits={"messages_per_minute": 2})
    client = await login(sandbox)
    for n in range(3):
        errors, _ = await client.sendmail(SCANNER, [ALICE], message(SCANNER, ALICE, f"m{n}").as_bytes())
        assert errors == {}
    assert sandbox.ctx.store.rejections() == {"submission throttled": 1}
    sandbox.ctx.clock.advance(61)
    await client.sendmail(SCANNER, [ALICE], message(SCANNER, ALICE, "later").as_bytes())
    await client.quit()
    assert sandbox.ctx.store.rejections() == {"submission throttled": 1}
    assert len(sandbox.ctx.store.list(mailbox=ALICE)) == 4


async def test_daily_recipient_limit_is_554_5_2_0_and_rolls(start_sandbox: Any) -> None:
    sandbox: Sandbox = await start_sandbox(limits={"recipients_per_day": 3})
    client = await login(sandbox)
    await client.sendmail(SCANNER, [ALICE, BOB], message(SCANNER, ALICE).as_bytes())
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await client.sendmail(SCANNER, [ALICE, EXTERNAL], message(SCANNER, ALICE).as_bytes())
    assert (refused.value.code, refused.value.message) == (
        554,
        "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
    )
    await client.sendmail(SCANNER, [EXTERNAL], message(SCANNER, EXTERNAL).as_bytes())  # the 3rd recipient
    sandbox.ctx.clock.advance(24 * 3600 + 1)
    errors, _ = await client.sendmail(SCANNER, [ALICE, BOB], message(SCANNER, ALICE).as_bytes())
    assert errors == {}
    await client.quit()
    assert sandbox.ctx.store.rejections() == {"submission 554 5.2.0": 1}


async def test_message_size_552_5_3_4(start_sandbox: Any) -> None:
    sandbox: Sandbox = await start_sandbox(limits={"max_message_size": 2048})
    client = await login(sandbox)
    assert "size" in client.esmtp_extensions
    assert client.esmtp_extensions["size"] == "157286400"
    response = await client.execute_command(b"MAIL", b"FROM:<" + SCANNER.encode() + b">", b"SIZE=5000")
    assert (response.code, response.message) == (552, "5.3.4 Message size exceeds fixed maximum message size")
    await client.rset()
    big = message(SCANNER, ALICE, body="x" * 70 + "\n" * 40).as_bytes() + b"y" * 76 * 40
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as announced:  # aiosmtplib announces SIZE=
        await client.sendmail(SCANNER, [ALICE], big)
    assert announced.value.code == 552
    await client.mail(SCANNER)  # no SIZE= parameter: refused after DATA
    await client.rcpt(ALICE)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await client.data(big)
    assert refused.value.code == 552
    await client.quit()
    assert sandbox.ctx.store.rejections() == {"submission 552 5.3.4": 3}
    assert sandbox.ctx.store.list() == []


async def test_recipients_per_message_452_4_5_3(start_sandbox: Any) -> None:
    sandbox: Sandbox = await start_sandbox(limits={"max_recipients_per_message": 2})
    client = await login(sandbox)
    await client.mail(SCANNER)
    assert (await client.rcpt(ALICE)).code == 250
    assert (await client.rcpt(BOB)).code == 250
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
        await client.rcpt(EXTERNAL)
    assert (refused.value.code, refused.value.message) == (452, "4.5.3 Too many recipients")
    await client.quit()


@pytest.mark.parametrize("stage", ["ehlo", "starttls", "auth", "mail", "rcpt", "data", "after_data"])
async def test_reply_fault_at_each_stage_applies_once(sandbox: Sandbox, stage: str) -> None:
    sandbox.ctx.faults.add(
        Fault(endpoint="submission", stage=stage, reply="451 4.7.500 Server busy, try later")
    )
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sandbox.submission_port, start_tls=False, timeout=10)
    await client.connect()
    steps: list[tuple[str, Any]] = [
        ("ehlo", lambda: client.execute_command(b"EHLO", b"printer.lan")),
        ("starttls", lambda: client.execute_command(b"STARTTLS")),
        (
            "auth",
            lambda: client.execute_command(
                b"AUTH", b"XOAUTH2", xoauth2(SCANNER, app_token(sandbox)).encode()
            ),
        ),
        ("mail", lambda: client.execute_command(b"MAIL", b"FROM:<" + SCANNER.encode() + b">")),
        ("rcpt", lambda: client.execute_command(b"RCPT", b"TO:<" + ALICE.encode() + b">")),
    ]
    for name, step in steps:
        if name == "starttls" and stage != "starttls":
            await client.starttls(tls_context=client_tls(sandbox))
            await client.ehlo(hostname="printer.lan")
            continue
        response = await step()
        if name == stage:
            assert (response.code, response.message) == (451, "4.7.500 Server busy, try later")
            if name == "starttls":  # retried: the TLS upgrade now goes through
                await client.starttls(tls_context=client_tls(sandbox))
                await client.ehlo(hostname="printer.lan")
                continue
            response = await step()  # the fault applied once: the retry goes through
        assert response.code in {235, 250}, (name, response)
    content = message(SCANNER, ALICE).as_bytes()
    if stage in {"data", "after_data"}:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.data(content)
        assert (refused.value.code, refused.value.message) == (451, "4.7.500 Server busy, try later")
        if stage == "after_data":  # the transaction is over: start a new one
            await client.mail(SCANNER)
            await client.rcpt(ALICE)
    assert (await client.data(content)).code == 250
    await client.quit()
    assert sandbox.ctx.store.rejections() == {"submission 451 4.7.500": 1}
    assert len(sandbox.ctx.store.list(mailbox=ALICE)) == 1


async def test_connect_fault_for_the_next_two_attempts(sandbox: Sandbox) -> None:
    sandbox.ctx.faults.add(
        Fault(endpoint="submission", stage="connect", reply="421 4.3.2 Service not available", times=2)
    )
    for _ in range(2):
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=sandbox.submission_port, start_tls=False, timeout=10
        )
        with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
            await client.connect()
        assert refused.value.code == 421
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sandbox.submission_port, start_tls=False, timeout=10)
    assert (await client.connect()).code == 220
    await client.quit()
    assert sandbox.ctx.store.rejections() == {"submission 421 4.3.2": 2}


async def test_stall_then_drop(sandbox: Sandbox) -> None:
    sandbox.ctx.faults.add(Fault(endpoint="submission", stage="mail", action="stall", stall_seconds=0.3))
    sandbox.ctx.faults.add(Fault(endpoint="submission", stage="rcpt", action="drop"))
    client = await login(sandbox)
    started = time.monotonic()
    assert (await client.mail(SCANNER)).code == 250
    assert time.monotonic() - started >= 0.3
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await client.rcpt(ALICE)
    client.close()
    assert sandbox.ctx.store.rejections() == {"submission drop rcpt": 1}


async def test_a_421_reply_closes_the_connection(sandbox: Sandbox) -> None:
    sandbox.ctx.faults.add(Fault(endpoint="mx", stage="mail", reply="421 4.3.2 Service not available"))
    reader, writer = await asyncio.open_connection("127.0.0.1", sandbox.mx_port)
    try:
        async with asyncio.timeout(10):
            await reader.readline()
            writer.write(b"HELO raw.contoso.test\r\nMAIL FROM:<" + SCANNER.encode() + b">\r\n")
            await reader.readline()
            assert await reader.readline() == b"421 4.3.2 Service not available\r\n"
            assert await reader.read() == b""  # the server closed the connection
    finally:
        writer.close()
        await writer.wait_closed()
    assert sandbox.ctx.store.rejections() == {"mx 421 4.3.2": 1}
