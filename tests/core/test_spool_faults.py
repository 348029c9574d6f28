"""Disk full and I/O errors on a real file system: ``452 4.3.1`` / ``451 4.3.0``, never ``250``.

The spool lives on a 256 KiB tmpfs mounted for the test (we run as root), so ENOSPC is real.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay365.service.relay import Relay
from tests.support import body_files, body_of, closed_port, make_settings, running_relay, smarthost

SMALL = b"Subject: small\r\n\r\nhello\r\n"


@pytest.fixture
def tmpfs_spool(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "spool"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def deliver(port: int, body: bytes) -> tuple[int, str]:
    """DATA from a device; returns the final reply (code, text), whatever stage refused it."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo("printer.lan")
        s.mail("scanner@contoso.com")
        s.rcpt("alice@contoso.com")
        reply: bytes | str
        try:
            code, reply = s.data(body)
        except smtplib.SMTPDataError as e:  # refused DATA itself (before 354)
            code, reply = e.smtp_code, e.smtp_error
        return code, reply.decode() if isinstance(reply, bytes) else reply


def settings_on(spool: Path, tmp_path: Path) -> object:
    return make_settings(
        tmp_path,
        server={"spool_dir": str(spool), "spool_min_free": 0},  # raw ENOSPC (reserve: test_spool_reserve.py)
        listener=[{"name": "lan", "port": 0, "tls": "none"}],
        transport=[smarthost(closed_port())],
        delivery={"min_backoff": 3600, "max_backoff": 7200, "poll_interval": 0.2},
        # The tracking log off the small file system: these tests count the queue's own bytes.
        tracking={"path": str(tmp_path / "tracking.db")},
    )


def fill(path: Path, *, leave: int = 0) -> None:
    """Fill the file system to the last byte, then give ``leave`` bytes back."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    try:
        if leave:
            os.ftruncate(fd, os.fstat(fd).st_size - leave)
    finally:
        os.close(fd)


async def queue_is_empty(relay: Relay) -> bool:
    return await relay.spool.list() == [] and body_files(relay.spool.messages_dir) == []  # type: ignore[attr-defined]


async def test_disk_full_answers_452_and_leaves_nothing(tmpfs_spool: Path, tmp_path: Path) -> None:
    settings = settings_on(tmpfs_spool, tmp_path)
    async with running_relay(settings) as relay:  # type: ignore[arg-type]
        port = relay.ports["lan"]
        big = b"Subject: big scan\r\n\r\n" + (b"x" * 76 + b"\r\n") * 13_000  # ~1 MB > 256 KiB
        code, text = await asyncio.to_thread(deliver, port, big)
        assert (code, text[:5]) == (452, "4.3.1"), (code, text)
        assert await queue_is_empty(relay)

        # Fill the disk to the last byte: even a tiny message cannot be made durable.
        filler = tmpfs_spool / "filler"
        fill(filler)
        code, text = await asyncio.to_thread(deliver, port, SMALL)
        assert (code, text[:5]) == (452, "4.3.1"), (code, text)
        assert await queue_is_empty(relay)

        # Space comes back: the relay accepts again, nothing was left behind by the failures.
        filler.unlink()
        code, text = await asyncio.to_thread(deliver, port, SMALL)
        assert code == 250, (code, text)
        [entry] = await relay.spool.list()
        assert text.endswith(entry.queue_id)
        assert (await body_of(relay.spool, entry)).endswith(SMALL)


async def test_disk_full_at_the_database_commit_answers_452(
    tmpfs_spool: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One page left: the body file fits, the WAL append of the commit does not (SQLITE_FULL).
    SQLite rolls the transaction back itself; the answer must still be 452 4.3.1, not 451."""
    settings = settings_on(tmpfs_spool, tmp_path)
    async with running_relay(settings) as relay:  # type: ignore[arg-type]
        port = relay.ports["lan"]
        code, _ = await asyncio.to_thread(deliver, port, SMALL)
        assert code == 250
        before = [e.queue_id for e in await relay.spool.list()]
        filler = tmpfs_spool / "filler"
        fill(filler, leave=4096)
        with caplog.at_level(logging.ERROR, logger="relay365.ingress.server"):
            code, text = await asyncio.to_thread(deliver, port, SMALL)
        assert (code, text[:5]) == (452, "4.3.1"), (code, text)
        assert "spool full: database or disk is full" in caplog.text
        assert [e.queue_id for e in await relay.spool.list()] == before
        assert body_files(relay.spool.messages_dir) == sorted(before)  # type: ignore[attr-defined]
        filler.unlink()
        code, text = await asyncio.to_thread(deliver, port, SMALL)
        assert code == 250, (code, text)
        assert len(await relay.spool.list()) == 2


async def test_messages_dir_gone_answers_451(tmp_path: Path) -> None:
    settings = settings_on(tmp_path / "spool", tmp_path)
    async with running_relay(settings) as relay:  # type: ignore[arg-type]
        port = relay.ports["lan"]
        shutil.rmtree(relay.spool.messages_dir)  # an admin or a broken disk takes the directory away
        code, text = await asyncio.to_thread(deliver, port, SMALL)
        assert (code, text[:5]) == (451, "4.3.0"), (code, text)
        assert await relay.spool.list() == []
        # A file where the directory was: ENOTDIR, another I/O error.
        relay.spool.messages_dir.write_bytes(b"")
        code, text = await asyncio.to_thread(deliver, port, SMALL)
        assert (code, text[:5]) == (451, "4.3.0"), (code, text)
        relay.spool.messages_dir.unlink()
        relay.spool.messages_dir.mkdir()
        code, text = await asyncio.to_thread(deliver, port, SMALL)
        assert code == 250, (code, text)


async def test_read_only_file_system_answers_451(tmp_path: Path) -> None:
    settings = settings_on(tmp_path / "spool", tmp_path)
    async with running_relay(settings) as relay:  # type: ignore[arg-type]
        port = relay.ports["lan"]
        code, _ = await asyncio.to_thread(deliver, port, SMALL)
        assert code == 250
        before = [e.queue_id for e in await relay.spool.list()]
        # The kernel turns a file system read-only after an I/O error (errors=remount-ro): EROFS.
        # A read-only bind mount over the messages directory gives exactly that errno.
        mdir = str(relay.spool.messages_dir)
        bind = subprocess.run(["mount", "--bind", mdir, mdir], capture_output=True, check=False)
        if bind.returncode != 0:
            pytest.skip(f"cannot bind-mount here (needs root): {bind.stderr.decode().strip()}")
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", mdir], check=True)
            code, text = await asyncio.to_thread(deliver, port, SMALL)
            assert (code, text[:5]) == (451, "4.3.0"), (code, text)
        finally:
            subprocess.run(["umount", mdir], check=True)
        assert [e.queue_id for e in await relay.spool.list()] == before
        code, text = await asyncio.to_thread(deliver, port, SMALL)
        assert code == 250, (code, text)
