"""``kill -9`` (and SIGTERM) of ``relay365 serve`` under load loses no acknowledged message and leaves
no half entry.

Several device threads (smtplib) send messages as fast as they can; every ``250 ... queued as ID``
is recorded with the exact body sent. The server is SIGKILLed (or SIGTERMed) mid-load. Then the spool
is opened the way the server opens it at start (recovery) and every acknowledged id must be there,
whole.
"""

from __future__ import annotations

import os
import random
import signal
import smtplib
import threading
import time
from pathlib import Path

import pytest

from relay365.spool.model import new_owner_id
from relay365.spool.sqlite import SqliteSpool
from tests.support import (
    ServeProcess,
    body_files,
    body_of,
    closed_port,
    send_message,
    smarthost_cfg,
    write_config,
)

THREADS = 8
LOAD_SECONDS = 3.0


class Load:
    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked: dict[str, bytes] = {}
        self.errors_after_kill = 0
        # Set just before the signal: from then on a reply other than 250 (an ingress worker whose
        # supervisor is gone answers 451 until it goes too) is an error after the kill, not a failure.
        self.killing = threading.Event()
        self.refused_before_kill: list[tuple[int, bytes]] = []

    def body(self, rng: random.Random, tag: str) -> bytes:
        lines = rng.randint(2, 900)  # ~80 B .. ~70 KB
        text = b"".join(f"{tag} line {i:05d} {'y' * rng.randint(0, 60)}\r\n".encode() for i in range(lines))
        return f"Subject: {tag}\r\nX-Load: {tag}\r\n\r\n".encode() + text

    def device(self, n: int) -> None:
        rng = random.Random(n)
        seq = 0
        while not self.stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as s:
                    s.ehlo(f"printer{n}.lan")
                    while not self.stop.is_set():
                        seq += 1
                        body = self.body(rng, f"t{n}-m{seq}")
                        s.mail(f"device{n}@contoso.com")
                        s.rcpt("archive@contoso.com")
                        code, reply = s.data(body)
                        if code != 250:
                            if not self.killing.is_set():
                                with self.lock:
                                    self.refused_before_kill.append((code, reply))
                            raise smtplib.SMTPDataError(code, reply)
                        with self.lock:
                            self.acked[reply.split()[-1].decode()] = body
            except (smtplib.SMTPException, OSError):
                with self.lock:
                    self.errors_after_kill += 1
                time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
async def test_stop_under_load_loses_no_acknowledged_message(tmp_path: Path, sig: signal.Signals) -> None:
    spool_dir = tmp_path / "spool"
    config = write_config(
        tmp_path,
        listener=[{"name": "lan", "port": 0, "tls": "none"}],
        transport=[smarthost_cfg(closed_port())],  # upstream down: everything stays queued
        delivery={"min_backoff": 3600, "max_backoff": 7200, "poll_interval": 0.5},
    )
    server = ServeProcess(config, tmp_path / "serve.log").start()
    try:
        load = Load(server.ports["lan"])
        threads = [threading.Thread(target=load.device, args=(n,), daemon=True) for n in range(THREADS)]
        for t in threads:
            t.start()
        time.sleep(LOAD_SECONDS)
        acked_before_kill = len(load.acked)
        load.killing.set()
        os.kill(server.pid, sig)
        assert server.proc is not None
        # SIGTERM is a clean shutdown (exit 0, in-flight commits finished); SIGKILL is a crash.
        assert server.proc.wait(30) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        load.stop.set()
        for t in threads:
            t.join(15)
            assert not t.is_alive()
    finally:
        server.kill()

    files_before = set(body_files(spool_dir / "messages"))
    spool = SqliteSpool(spool_dir)
    await spool.open()
    try:
        await spool.recover(new_owner_id())  # what the server does at start
        entries = {e.queue_id: e for e in await spool.list()}
        bodies = {q: await body_of(spool, e) for q, e in entries.items()}
        sizes = {q: spool.body_file(e).stat().st_size for q, e in entries.items()}
    finally:
        await spool.close()
    files_after = set(body_files(spool_dir / "messages"))

    missing = [q for q in load.acked if q not in entries]
    damaged = [q for q in load.acked if q in entries and not bodies[q].endswith(load.acked[q])]
    print(
        f"\n{sig.name} under load: {THREADS} devices, {len(load.acked)} messages acknowledged"
        f" ({acked_before_kill} before the kill signal), {len(entries)} in the spool after restart,"
        f" {len(set(entries) - set(load.acked))} committed but unacknowledged (in flight),"
        f" {len(files_before - files_after)} half-written leftover(s) removed at start,"
        f" missing {len(missing)}, damaged {len(damaged)}"
    )
    assert len(load.acked) >= 50, "the load was too light to mean anything"
    assert load.refused_before_kill == []
    assert missing == []
    assert damaged == []
    # Complete or absent: every row has its whole body, every body file has its row.
    assert files_after == set(entries)
    for e in entries.values():
        assert sizes[e.queue_id] == e.size
        assert [r.rcpt for r in e.recipients] == ["archive@contoso.com"]

    # The server starts again on the recovered spool and still accepts mail.
    server = ServeProcess(config, tmp_path / "serve2.log").start()
    try:
        qid = send_message(server.ports["lan"])
        assert len(qid) == 19
        assert server.terminate() == 0
    finally:
        server.kill()
