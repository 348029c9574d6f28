"""SIGTERM with device sessions open (issue 8, item 11): ``relay365 serve`` as a subprocess.

Idle sessions get ``421 4.3.2 Service shutting down`` at once and are closed; a session in the middle
of DATA finishes its message (250 after fsync) and then gets the 421; a session that does not finish
within ``shutdown_grace`` gets the 421 and is closed, and its unacknowledged message is not queued.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay365.spool.sqlite import SqliteSpool
from tests.support import RawSMTP, ServeProcess, closed_port, smarthost_cfg, write_config

GOODBYE = "421 4.3.2 Service shutting down"


async def start_data(port: int) -> RawSMTP:
    c = await RawSMTP.connect(port)
    await c.reply()
    assert (await c.cmd("EHLO printer.lan")).startswith("250")
    assert (await c.cmd("MAIL FROM:<scan@contoso.com>")).startswith("250")
    assert (await c.cmd("RCPT TO:<bob@contoso.com>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    await c.send(b"Subject: half\r\n\r\nfirst half\r\n")
    return c


async def rest(c: RawSMTP, timeout: float = 20.0) -> str:
    return (await asyncio.wait_for(c.reader.read(), timeout)).decode()


async def queued_ids(spool_dir: Path) -> list[str]:
    spool = SqliteSpool(spool_dir)
    await spool.open()
    try:
        return [e.queue_id for e in await spool.list()]
    finally:
        await spool.close()


async def test_sigterm_says_421_to_open_sessions(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        listener=[{"name": "lan", "port": 0, "tls": "none"}],
        transport=[smarthost_cfg(closed_port())],  # upstream down: the message stays queued
        server={"shutdown_grace": 30.0},
    )
    server = ServeProcess(cfg, tmp_path / "serve.log").start()
    try:
        port = server.ports["lan"]
        idle = await RawSMTP.connect(port)
        assert (await idle.reply()).startswith("220")
        assert (await idle.cmd("EHLO printer.lan")).startswith("250")
        busy = await start_data(port)
        server.proc.terminate()  # type: ignore[union-attr]  # SIGTERM
        # The idle session is told at once, while the other is still in DATA.
        assert await rest(idle) == GOODBYE + "\r\n"
        await busy.send(b"second half\r\n.\r\n")
        lines = (await rest(busy)).splitlines()
        assert len(lines) == 2 and lines[0].startswith("250 2.0.0 Ok: queued as "), lines
        assert lines[1] == GOODBYE
        queue_id = lines[0].split()[-1]
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, server.proc.wait, 30) == 0  # type: ignore[union-attr]
        # The acknowledged message is in the queue.
        assert await queued_ids(tmp_path / "spool") == [queue_id]
        for c in (idle, busy):
            await c.close()
    finally:
        server.kill()


async def test_sessions_that_do_not_finish_within_the_grace_are_closed(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        listener=[{"name": "lan", "port": 0, "tls": "none"}],
        transport=[smarthost_cfg(closed_port())],
        server={"shutdown_grace": 1.0},
    )
    server = ServeProcess(cfg, tmp_path / "serve.log").start()
    try:
        stalled = await start_data(server.ports["lan"])
        server.proc.terminate()  # type: ignore[union-attr]
        assert await rest(stalled) == GOODBYE + "\r\n"  # after the grace, mid-DATA
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, server.proc.wait, 30) == 0  # type: ignore[union-attr]
        assert await queued_ids(tmp_path / "spool") == []  # never acknowledged, never queued
        await stalled.close()
    finally:
        server.kill()
