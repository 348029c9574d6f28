"""Memory stays bounded while many large messages stream in (aiosmtpd alone holds each in RAM)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import RawSMTP

SESSIONS = 50  # reliability.md: 50 concurrent 30 MiB messages
MESSAGE = 30 * 1024 * 1024  # 30 MiB each: 1.5 GiB in flight at once


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


async def one_message(port: int, line: bytes) -> str:
    c = await RawSMTP.connect(port)
    await c.reply()
    await c.cmd("EHLO big.sender")
    await c.cmd("MAIL FROM:<scan@contoso.com>")
    await c.cmd("RCPT TO:<archive@contoso.com>")
    assert (await c.cmd("DATA")).startswith("354")
    await c.send(b"Subject: big\r\n\r\n")
    for _ in range(MESSAGE // len(line)):
        await c.send(line)
    reply = await c.cmd(b".", timeout=120)
    await c.close()
    return reply


@pytest.mark.slow
async def test_concurrent_large_messages_memory_is_bounded(tmp_path: Path) -> None:
    config = tmp_path / "relay365.toml"
    config.write_text(f"""
[server]
spool_dir = "spool"
[[listener]]
name = "lan"
port = 0
tls = "none"
auth = false
max_message_size = {MESSAGE * 2}
[[device]]
name = "scanner"
ip_allow = ["127.0.0.1/32"]
[[transport]]
name = "nowhere"
host = "127.0.0.1"
port = {closed_port()}
tls = "none"
""")
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay365", "serve", "-c", str(config)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        assert proc.stderr is not None
        port = 0
        while not port:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stderr.readline), 30)
            assert line, "relay exited"
            if m := re.search(r"relay365 listening: lan on [0-9.]+:(\d+)", line):
                port = int(m.group(1))
        base = peak_rss_kib(proc.pid)
        chunk = b"y" * 998 + b"\r\n"
        replies = await asyncio.gather(*(one_message(port, chunk * 64) for _ in range(SESSIONS)))
        assert all(r.startswith("250 2.0.0") for r in replies), replies
        peak = peak_rss_kib(proc.pid)
        print(
            f"relay RSS: {base / 1024:.0f} MiB at start, peak {peak / 1024:.0f} MiB after "
            f"{SESSIONS} x {MESSAGE >> 20} MiB concurrent messages"
        )
        assert peak - base < 64 * 1024, f"peak grew by {(peak - base) / 1024:.0f} MiB"
        files = [p for p in (tmp_path / "spool" / "messages").rglob("*") if p.is_file()]
        assert len(files) == SESSIONS and all(f.stat().st_size > MESSAGE - (1 << 16) for f in files)
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()
