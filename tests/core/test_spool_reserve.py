"""A full spool disk on a real (small tmpfs) file system.

1. A free-space reserve keeps the queue's own bookkeeping possible (Postfix's ``queue_minfree``):
   ingress answers ``452 4.3.1`` before free space falls below it, and refuses at MAIL a message
   whose announced SIZE would cut into it (RFC 1870 section 6.1).
2. When a delivery outcome cannot be recorded, all delivery stops until the spool writes again, so
   a message reaches the upstream at most once more per fault (at-least-once, never a loop).
Copies are counted per Message-ID at a capture upstream.
"""

from __future__ import annotations

import asyncio
import collections
import email
import logging
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay365.errors import ConfigError
from relay365.service.relay import Relay
from relay365.spool.model import RcptState
from tests.core.test_admin import samples
from tests.core.test_spool_faults import SMALL, deliver, fill
from tests.support import (
    Clock,
    RecordingUpstream,
    body_files,
    make_settings,
    running_relay,
    send_message,
    smarthost,
    wait_until,
)

RESERVE = 1 << 20  # 1 MiB on an 8 MiB file system
N = 30


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "spool"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def settings_on(spool: Path, tmp_path: Path, port: int, **server: Any) -> Any:
    return make_settings(
        tmp_path,
        server={"spool_dir": str(spool), "spool_min_free": RESERVE, **server},
        listener=[{"name": "lan", "port": 0, "tls": "none"}],
        transport=[smarthost(port)],
        delivery={"min_backoff": 60, "max_backoff": 600, "poll_interval": 0.2},
        admin={"port": 0},
    )


def body(n: int, size: int = 0) -> bytes:
    return (
        f"Subject: scan {n}\r\nMessage-ID: <scan-{n}@contoso.com>\r\n\r\n".encode()
        + (b"x" * 76 + b"\r\n") * (size // 78)
        + f"page {n}\r\n".encode()
    )


def copies(upstream: RecordingUpstream) -> collections.Counter[str]:
    return collections.Counter(
        str(email.message_from_bytes(m.content)["Message-ID"]) for m in upstream.messages
    )


async def queue_deferred(relay: Relay, upstream: RecordingUpstream, count: int) -> list[str]:
    """Queue ``count`` messages the upstream defers once (451 at MAIL): due again after 60 s."""
    upstream.plan.replies["mail"] = ["451 4.3.0 try again later"] * count
    ids = [await asyncio.to_thread(send_message, relay.ports["lan"], body=body(n)) for n in range(count)]

    async def all_deferred() -> bool:
        entries = await relay.spool.list()
        return len(entries) == count and all(e.recipients[0].state is RcptState.DEFERRED for e in entries)

    await wait_until(all_deferred, 20, f"{count} deferred messages")
    return ids


async def drained(relay: Relay) -> bool:
    return await relay.spool.list() == [] and body_files(relay.spool.messages_dir) == []  # type: ignore[attr-defined]


def mail_with_size(port: int, size: int | None) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo("printer.lan")
        return s.mail("scanner@contoso.com", options=[f"SIZE={size}"] if size is not None else [])


def data_after_fill(port: int, filler: Path, leave: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo("printer.lan")
        assert s.mail("scanner@contoso.com")[0] == 250
        assert s.rcpt("alice@contoso.com")[0] == 250
        fill(filler, leave=leave)
        return s.docmd("DATA")


async def test_ingress_keeps_a_reserve_for_the_queues_bookkeeping(
    tmpfs: Path, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    clock = Clock()
    async with running_relay(settings_on(tmpfs, tmp_path, upstream.port), clock=clock) as relay:
        port = relay.ports["lan"]
        await queue_deferred(relay, upstream, 10)
        fill(tmpfs / "filler", leave=RESERVE + 64 * 1024)  # another program takes the rest

        # Announced SIZE that would cut into the reserve: refused at MAIL (RFC 1870 6.1).
        code, text = await asyncio.to_thread(mail_with_size, port, 200_000)
        assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
        code, _ = await asyncio.to_thread(mail_with_size, port, 20_000)
        assert code == 250
        # No SIZE announced, 200 KB sent: refused at the end of DATA, nothing kept.
        code, reply = await asyncio.to_thread(deliver, port, body(100, 200_000))
        assert (code, reply[:5]) == (452, "4.3.1"), (code, reply)
        # A small message still fits above the reserve.
        code, reply = await asyncio.to_thread(deliver, port, body(101))
        assert code == 250, (code, reply)
        await upstream.wait_for(1)  # (the upstream defers only the first ten: this one goes at once)

        # Between RCPT and DATA the disk fills below the reserve: DATA is refused before 354.
        code, text = await asyncio.to_thread(data_after_fill, port, tmpfs / "filler2", RESERVE - 8192)
        assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
        code, text = await asyncio.to_thread(mail_with_size, port, None)  # and at MAIL from now on
        assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
        code, reply = await asyncio.to_thread(deliver, port, SMALL)
        assert code != 250, (code, reply)
        assert len(await relay.spool.list()) == 10

        # The reserve is what the queue records its outcomes in: everything drains, once each.
        clock.advance(60)
        await wait_until(lambda: drained(relay), 20, "the queue to drain")
        got = copies(upstream)
        assert len(got) == 11 and set(got.values()) == {1}, got


async def claimed(relay: Relay) -> bool:
    return any(e.claimed_by for e in await relay.spool.list())


async def fill_while_delivering(
    relay: Relay, upstream: RecordingUpstream, clock: Clock, filler: Path
) -> None:
    """Make everything due and fill the disk to the last byte (the reserve included) once the first
    deliveries are under way: claiming is a write too, so only messages claimed before the disk
    filled reach the upstream (the upstream holds its DATA reply meanwhile), and their outcomes
    cannot be recorded."""
    upstream.plan.stall_after_data = 0.5
    clock.advance(60)
    await wait_until(lambda: claimed(relay), 10, "the first claims")
    fill(filler, leave=0)


async def stopped_metric(http: httpx.AsyncClient) -> float:
    return samples((await http.get("/metrics")).text)[("relay365_delivery_stopped", ())]


async def test_full_disk_stops_delivery_until_outcomes_can_be_recorded(
    tmpfs: Path, tmp_path: Path, upstream: RecordingUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    async with running_relay(settings_on(tmpfs, tmp_path, upstream.port), clock=clock) as relay:
        assert relay.admin is not None and relay.scheduler is not None
        await queue_deferred(relay, upstream, N)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{relay.admin.port}", trust_env=False, timeout=10
        ) as http:
            assert await stopped_metric(http) == 0.0
            with caplog.at_level(logging.INFO, logger="relay365.delivery"):
                # all due: delivered upstream, but "delivered" cannot be recorded
                await fill_while_delivering(relay, upstream, clock, tmpfs / "filler")
                await upstream.wait_for(1)
                for _ in range(10):  # an hour passes: back-off and cool-downs expire many times over
                    clock.advance(360)
                    relay.scheduler.wake()
                    await asyncio.sleep(0.3)
                before = copies(upstream)
                health = await http.get("/api/health")
                assert health.status_code == 503, health.text
                state = health.json()
                assert state["status"] == "degraded" and state["delivery"]["stopped"] is True
                assert "spool full" in state["delivery"]["reason"]
                assert await stopped_metric(http) == 1.0
                # Delivery stopped at the first outcome it could not record: nothing went twice.
                assert set(before.values()) == {1} and len(before) <= 10, before

                upstream.plan.stall_after_data = 0.0
                (tmpfs / "filler").unlink()  # space comes back
                await wait_until(lambda: drained(relay), 30, "the queue to drain")
            got = copies(upstream)
            assert len(got) == N and set(got.values()) == {1}, got  # nothing lost, nothing twice
            assert (await http.get("/api/health")).json()["status"] == "ok"
            assert await stopped_metric(http) == 0.0
    assert caplog.text.count("delivery stopped") == 1, caplog.text
    assert caplog.text.count("delivery resumed") == 1


async def test_outcomes_lost_in_a_restart_cost_at_most_one_copy(
    tmpfs: Path, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    """The relay stops while outcomes wait to be recorded: after the restart those messages go once
    more (at-least-once), every other message once, and nothing is lost."""
    clock = Clock()
    settings = settings_on(tmpfs, tmp_path, upstream.port)
    async with running_relay(settings, clock=clock) as relay:
        assert relay.scheduler is not None
        await queue_deferred(relay, upstream, N)
        await fill_while_delivering(relay, upstream, clock, tmpfs / "filler")
        await upstream.wait_for(1)
        await wait_until(lambda: _stopped(relay), 10, "delivery to stop")
    first = copies(upstream)  # the relay has stopped: every delivery under way has finished
    upstream.plan.stall_after_data = 0.0
    (tmpfs / "filler").unlink()
    async with running_relay(settings, clock=clock) as relay:
        await wait_until(lambda: drained(relay), 30, "the queue to drain")
    got = copies(upstream)
    assert len(got) == N, got
    assert {mid for mid, c in got.items() if c == 2} == set(first) and max(got.values()) == 2, got


async def _stopped(relay: Relay) -> bool:
    assert relay.scheduler is not None
    return relay.scheduler.delivery_stopped() is not None


def test_reserve_setting_is_validated(tmp_path: Path) -> None:
    assert make_settings(tmp_path).server.spool_min_free == 64 * 1024 * 1024  # default: 64 MiB
    with pytest.raises(ConfigError, match=r"Config 'server.spool_min_free' has value -1\. Must be 0 or more"):
        make_settings(tmp_path, server={"spool_min_free": -1})
