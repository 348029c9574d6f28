#!/usr/bin/env python3
"""Delivery benchmark against the local Exchange Online sandbox (not a test; prints numbers).

1. Throughput: N messages from a device through relay365 into the sandbox, per transport
   (direct_send, submission with XOAUTH2 paced off, graph), measured from the first 250 to the last
   message stored in a sandbox mailbox.
2. Pacing: M mailboxes x N messages through SMTP AUTH submission with a small per-window limit;
   prints the drain time against the minimum the limits allow and the sandbox's throttling counters.

    python bench/bench_delivery.py [--messages 200] [--pacing-per-mailbox 12]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import smtplib
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import example_tenant
from relay365.service.relay import Relay
from relay365.settings import parse_settings

SECRET_ENV = "RELAY365_BENCH_APP_SECRET"
APP = "11111111-2222-3333-4444-555555555555"


def transports(sb: Sandbox, **submission_extra: Any) -> dict[str, dict[str, Any]]:
    oauth = {
        "tenant": sb.ctx.tenant.tenant_id,
        "client_id": APP,
        "client_secret_env": SECRET_ENV,
        "authority": sb.base_url,
        "authority_ca_file": str(sb.ca_path),
    }
    return {
        "direct_send": {
            "name": "t",
            "type": "direct_send",
            "host": "127.0.0.1",
            "port": sb.mx_port,
            "ca_file": str(sb.ca_path),
            "accepted_domains": ["contoso.test"],
        },
        "submission": {
            "name": "t",
            "type": "submission",
            "host": "127.0.0.1",
            "port": sb.submission_port,
            "ca_file": str(sb.ca_path),
            "mailbox": "scanner@contoso.test",
            **oauth,
            **submission_extra,
        },
        "graph": {
            "name": "t",
            "type": "graph",
            "mailbox": "scanner@contoso.test",
            "graph_url": sb.graph_url,
            "ca_file": str(sb.ca_path),
            **oauth,
        },
    }


def relay_settings(tmp: Path, transport: dict[str, Any], **delivery: Any) -> Any:
    return parse_settings(
        {
            "server": {"hostname": "bench.relay", "spool_dir": str(tmp / "spool"), "log_level": "WARNING"},
            "listener": [{"name": "lan", "port": 0, "tls": "none", "auth": False}],
            "device": [{"name": "bench", "ip_allow": ["127.0.0.0/8"]}],
            "delivery": {"poll_interval": 0.2, "concurrency": 20, **delivery},
            "transport": [transport],
        },
        base=tmp,
    )


def send_many(port: int, count: int, rcpt: str, mail_from: str = "scanner@contoso.test") -> None:
    body = f"From: {mail_from}\r\nTo: {rcpt}\r\nSubject: bench\r\n\r\n".encode() + b"x" * 4000 + b"\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        for _ in range(count):
            s.sendmail(mail_from, [rcpt], body)


async def wait_stored(sb: Sandbox, count: int, mailbox: str | None, limit: float) -> float:
    start = time.monotonic()
    while len(sb.ctx.store.list(mailbox=mailbox, folder="Inbox")) < count:
        if time.monotonic() - start > limit:
            raise TimeoutError(f"only {len(sb.ctx.store.list(mailbox=mailbox))}/{count} arrived")
        await asyncio.sleep(0.05)
    return time.monotonic()


async def throughput(kind: str, count: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        async with Sandbox(example_tenant(), state_dir=tmp / "sb") as sb:
            extra = {"messages_per_minute": 100_000} if kind == "submission" else {}
            transport = transports(sb, **extra)[kind]
            relay = Relay(relay_settings(tmp, transport))
            await relay.start()
            try:
                start = time.monotonic()
                await asyncio.to_thread(send_many, relay.ports["lan"], count, "alice@contoso.test")
                accepted = time.monotonic()
                done = await wait_stored(sb, count, "alice@contoso.test", 600)
            finally:
                await relay.stop(grace=5)
            print(
                f"{kind:12s} {count} msgs: accepted {count / (accepted - start):7.1f} msg/s, "
                f"delivered end-to-end {count / (done - start):7.1f} msg/s"
            )


async def pacing(mailboxes: int, per_mailbox: int, limit: int, window: float) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = example_tenant()
        apps = {k: replace(a, mailboxes=None) for k, a in base.apps.items()}  # both mailboxes in scope
        limits = replace(base.limits, messages_per_minute=limit, submission_window_seconds=int(window))
        tenant = replace(base, apps=apps, limits=limits)

        async with Sandbox(tenant, state_dir=tmp / "sb") as sb:
            senders = ["scanner@contoso.test", "alice@contoso.test"][:mailboxes]
            relays = []
            for i, mailbox in enumerate(senders):
                t = transports(sb, messages_per_minute=limit, pacing_window=window)["submission"]
                t |= {"name": f"m{i}", "mailbox": mailbox}
                relays.append(Relay(relay_settings(tmp / f"r{i}", t)))
            for r in relays:
                await r.start()
            try:
                start = time.monotonic()
                await asyncio.gather(
                    *(
                        asyncio.to_thread(send_many, r.ports["lan"], per_mailbox, "bob@fabrikam.test", m)
                        for r, m in zip(relays, senders, strict=True)
                    )
                )
                done = await wait_stored(sb, mailboxes * per_mailbox, "bob@fabrikam.test", 600)
            finally:
                for r in relays:
                    await r.stop(grace=5)
            minimum = math.floor((per_mailbox - 1) / limit) * window
            took = done - start
            print(
                f"pacing: {mailboxes} mailbox(es) x {per_mailbox} msgs at {limit}/{window:.0f}s: "
                f"drained in {took:.2f}s, minimum {minimum:.2f}s, ratio {took / minimum:.3f}; "
                f"sandbox rejections: {sb.ctx.store.rejections() or 'none'}"
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--pacing-per-mailbox", type=int, default=12)
    ap.add_argument("--limit", type=int, default=5)
    ap.add_argument("--window", type=float, default=4.0)
    args = ap.parse_args()
    os.environ[SECRET_ENV] = "sandbox-secret-relay365"
    for kind in ("direct_send", "submission", "graph"):
        asyncio.run(throughput(kind, args.messages))
    asyncio.run(pacing(2, args.pacing_per_mailbox, args.limit, args.window))


if __name__ == "__main__":
    sys.exit(main())
