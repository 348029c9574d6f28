"""Several processes on one SQLite spool, for real: a second process's recovery never touches the
first one's files or claims while it lives, and cleans up after it once it is killed (-9); a change
made by another process (``relay365 queue retry``) wakes a waiting spool handle.

The child is a separate Python process working on the spool through ``SqliteSpool``; it reports what
it holds as JSON lines on stdout and waits for orders on stdin.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay365.spool.model import Envelope
from relay365.spool.sqlite import SqliteSpool
from tests.support import body_files, run_cli, write_config

CHILD = r"""
import asyncio, json, sys, time
from pathlib import Path
from relay365.spool.model import Envelope
from relay365.spool.sqlite import SqliteSpool

ENV = Envelope("scanner@contoso.com", ("alice@contoso.com",), device="printer")

def say(**data):
    print(json.dumps(data), flush=True)

async def main():
    spool = SqliteSpool(Path(sys.argv[1]))
    await spool.open()
    await spool.recover("child")
    await spool.enqueue(ENV, b"Subject: one\r\n\r\nfirst\r\n")
    [claimed] = await spool.claim(owner="child", now=time.time(), limit=1, lease=3600)
    receiving = spool.incoming()
    receiving.write(b"Subject: big\r\n\r\n" + b"x" * 300_000)
    await receiving.drain()
    say(claimed=claimed.queue_id, receiving=receiving.queue_id, path=str(receiving.path))
    assert (await asyncio.to_thread(sys.stdin.readline)).strip() == "commit"
    receiving.write(b"\r\nthe end\r\n")
    say(committed=await receiving.commit(ENV))
    dying = spool.incoming()
    dying.write(b"Subject: never\r\n\r\n" + b"y" * 300_000)
    await dying.drain()
    say(receiving=dying.queue_id, path=str(dying.path))
    await asyncio.Event().wait()  # until killed

asyncio.run(main())
"""


class Child:
    def __init__(self, spool_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(spool_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the child exited ({self.proc.poll()})"
        return dict(json.loads(line))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Child]:
    c = Child(tmp_path / "spool")
    try:
        yield c
    finally:
        c.kill()


async def test_recovery_in_a_second_process_spares_the_first_until_it_dies(
    tmp_path: Path, child: Child
) -> None:
    first = await asyncio.to_thread(child.read)
    spool = SqliteSpool(tmp_path / "spool")
    await spool.open()
    try:
        found = await spool.recover("server-2")  # what a second server or worker does at start
        assert found.dead_owners == () and found.bodies_removed == 0 and found.claims_released == 0
        assert Path(first["path"]).stat().st_size > 300_000  # the child's half-received message stays
        assert (await spool.get(first["claimed"])).claimed_by == "child"
        assert await spool.claim(owner="server-2", now=time.time(), limit=10, lease=60) == []

        child.send("commit")
        committed = (await asyncio.to_thread(child.read))["committed"]
        assert committed == first["receiving"]
        async with spool.body(await spool.get(committed)) as reader:
            assert (await reader.read_all()).endswith(b"x\r\nthe end\r\n")

        dying = await asyncio.to_thread(child.read)
        assert Path(dying["path"]).exists()
        await asyncio.to_thread(child.kill)  # kill -9 mid-delivery and mid-receive
        found = await spool.recover("server-2")
        assert found.dead_owners == ("child",)
        assert (found.bodies_removed, found.claims_released) == (1, 1)
        assert not Path(dying["path"]).exists()
        claimed = await spool.claim(owner="server-2", now=time.time(), limit=10, lease=60)
        assert sorted(e.queue_id for e in claimed) == sorted([first["claimed"], committed])
        assert body_files(spool.messages_dir) == sorted([first["claimed"], committed])
    finally:
        await spool.close()


async def test_queue_retry_in_another_process_wakes_a_waiting_spool(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    spool = SqliteSpool(tmp_path / "spool")
    await spool.open()
    try:
        await spool.recover("server")
        await spool.enqueue(
            Envelope("scanner@contoso.com", ("alice@contoso.com",)), b"Subject: x\r\n\r\nx\r\n"
        )
        assert await spool.wait_changed(0.01) is True  # (our own new mail)
        assert await spool.wait_changed(0.2) is False
        generation = spool.flush_generation()
        waiting = asyncio.create_task(spool.wait_changed(30))
        r = await asyncio.to_thread(run_cli, "queue", "retry", "--all", "-c", str(config))
        assert r.returncode == 0, r.stderr
        finished = time.monotonic()
        assert await waiting is True
        noticed = time.monotonic() - finished
        assert spool.flush_generation() == generation + 1
        print(f"\nqueue retry in another process noticed {noticed * 1000:.0f} ms after it finished")
    finally:
        await spool.close()
