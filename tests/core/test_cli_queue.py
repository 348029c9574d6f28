"""``relay365 queue list|show|hold|release|retry|delete`` as subprocesses while ``relay365 serve``
runs on the same spool: the admin's view and the server's behaviour agree."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from relay365.spool.sqlite import SqliteSpool
from tests.support import (
    body_files,
    closed_port,
    run_cli,
    send_message,
    serving,
    smarthost_cfg,
    write_config,
)

QUEUE_ID = re.compile(r"\b[0-9A-F]{19}\b")


async def _state(spool_dir: Path, qid: str) -> tuple[bool, int, float]:
    spool = SqliteSpool(spool_dir)
    await spool.open()
    try:
        e = await spool.get(qid)
        return e.held, e.recipients[0].attempts, e.recipients[0].next_attempt
    finally:
        await spool.close()


async def _wait_attempts(spool_dir: Path, qid: str, n: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (await _state(spool_dir, qid))[1] < n:
        assert time.monotonic() < deadline, f"{qid} never reached {n} attempts"
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_queue_commands_while_serving(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    config = write_config(
        tmp_path,
        listener=[{"name": "lan", "port": 0, "tls": "none"}],
        transport=[smarthost_cfg(closed_port())],
        delivery={"min_backoff": 3600, "max_backoff": 7200, "poll_interval": 0.2},
    )
    cli = ("-c", str(config))
    with serving(config, tmp_path / "serve.log") as server:
        port = server.ports["lan"]
        q1 = await asyncio.to_thread(send_message, port, rcpts=("alice@contoso.com", "bob@contoso.com"))
        q2 = await asyncio.to_thread(send_message, port, mail_from="app@contoso.com")
        await _wait_attempts(spool_dir, q1, 1)  # the server tried once (upstream down): deferred

        r = await asyncio.to_thread(run_cli, "queue", "list", *cli)
        assert r.returncode == 0, r.stderr
        assert "2 message(s) in the queue" in r.stdout
        assert set(QUEUE_ID.findall(r.stdout)) == {q1, q2}

        r = await asyncio.to_thread(run_cli, "queue", "show", q1, *cli)
        assert r.returncode == 0, r.stderr
        assert q1 in r.stdout and "from=<scanner@contoso.com>" in r.stdout and "device=local" in r.stdout
        assert "alice@contoso.com" in r.stdout and "bob@contoso.com" in r.stdout
        assert "deferred" in r.stdout and "451 4.4.1" in r.stdout

        r = await asyncio.to_thread(run_cli, "queue", "hold", q1, *cli)
        assert r.returncode == 0 and f"{q1} held" in r.stdout
        assert (await _state(spool_dir, q1))[0] is True
        r = await asyncio.to_thread(run_cli, "queue", "list", *cli)
        assert "HOLD" in r.stdout
        # retry while held: due now, but a held message is not attempted
        r = await asyncio.to_thread(run_cli, "queue", "retry", q1, *cli)
        assert r.returncode == 0 and "scheduled for delivery now" in r.stdout
        held, attempts, nxt = await _state(spool_dir, q1)
        assert held and nxt <= time.time()
        await asyncio.sleep(1.0)  # five poll intervals
        assert (await _state(spool_dir, q1))[1] == attempts

        r = await asyncio.to_thread(run_cli, "queue", "release", q1, *cli)
        assert r.returncode == 0 and f"{q1} released" in r.stdout
        # The upstream is down, so the server holds its mail back for a while (Postfix: a dead
        # destination); "queue retry" means now, and lifts that too.
        r = await asyncio.to_thread(run_cli, "queue", "retry", q1, *cli)
        assert r.returncode == 0
        await _wait_attempts(spool_dir, q1, attempts + 1)  # released and due: the server tries again

        assert (await _state(spool_dir, q1))[2] > time.time() + 3000  # deferred again (back-off)

        assert q2 in body_files(spool_dir / "messages")
        r = await asyncio.to_thread(run_cli, "queue", "delete", q2, *cli)
        assert r.returncode == 0 and f"{q2} deleted" in r.stdout
        assert q2 not in body_files(spool_dir / "messages")
        r = await asyncio.to_thread(run_cli, "queue", "list", *cli)
        assert "1 message(s) in the queue" in r.stdout and q2 not in r.stdout

        for cmd in ("show", "hold", "delete"):
            r = await asyncio.to_thread(run_cli, "queue", cmd, q2, *cli)
            assert r.returncode == 2 and f"no queue entry {q2}" in r.stderr, (cmd, r.stderr)
        assert server.terminate() == 0
    assert "shutting down" in server.log_text()


def test_queue_without_spool(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    r = run_cli("queue", "list", "-c", str(config))
    assert r.returncode == 2 and "no spool at" in r.stderr
