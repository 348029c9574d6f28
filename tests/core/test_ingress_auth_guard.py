"""AUTH brute-force protection (issue 8, items 2, 3 and 4), over real sessions with a clock the
test moves.

Failures count per source address and per user name; a success clears only that user's count; the
block is checked before any password is verified (also on connections opened before it), and the right
password during a block does not lift it. A block refuses AUTH, never the connection: devices known by
IP address or client certificate behind the same address keep sending. AUTH PLAIN with an authorization
identity other than the user is refused (RFC 4616 section 2).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay365.credentials import hash_password
from relay365.service.relay import Relay
from tests.support import Clock, RawSMTP, RecordingUpstream, make_settings, running_relay, smarthost

ATTACKER_PW, VICTIM_PW = "attacker-own-pw", "victim-Secret-9"
DEVICES = [
    {"name": "attacker", "password_hash": hash_password(ATTACKER_PW)},
    {"name": "victim", "password_hash": hash_password(VICTIM_PW)},
]
LIMIT = 3
BLOCK = 300.0
BLOCKED = "454 4.7.0 "


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def relay(
    tmp_path: Path, upstream: RecordingUpstream, clock: Clock, request: pytest.FixtureRequest
) -> AsyncIterator[Relay]:
    marker = request.node.get_closest_marker("relay")
    extra: dict[str, Any] = dict(marker.kwargs) if marker else {}
    extra.setdefault("device", DEVICES)
    settings = make_settings(
        tmp_path,
        transport=[smarthost(upstream.port)],
        listener=[{"name": "lan", "port": 0, "tls": "none", "allow_plaintext_auth": True}],
        server={"auth_failures_before_block": LIMIT, "auth_block_seconds": BLOCK},
        **extra,
    )
    async with running_relay(settings, monotonic=clock) as r:
        yield r


def plain(user: str, password: str, authzid: str = "") -> str:
    return "AUTH PLAIN " + base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


async def session(relay: Relay, source: str = "127.0.0.1") -> RawSMTP:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", relay.ports["lan"], local_addr=(source, 0)), 10
    )
    c = RawSMTP(reader, writer)
    assert (await c.reply()).startswith("220")
    assert (await c.cmd("EHLO printer.lan")).startswith("250")
    return c


async def login(relay: Relay, user: str, password: str, source: str = "127.0.0.1") -> str:
    c = await session(relay, source)
    try:
        return await c.cmd(plain(user, password))
    finally:
        await c.close()


async def test_own_logins_do_not_reset_the_count_for_another_user(relay: Relay) -> None:
    """Item 2: the attacker interleaves its own good logins with guesses at the victim's password."""
    rounds = []
    for i in range(6):
        own = await login(relay, "attacker", ATTACKER_PW)
        rounds.append((own[:3], (await login(relay, "victim", f"guess-{i}"))[:3]))
    # Before: each good login reset the address's count, so the guessing never stopped.
    assert rounds == [("235", "535")] * LIMIT + [("454", "454")] * (6 - LIMIT), rounds
    # The right password during the block is not even tried, and does not lift it.
    assert (await login(relay, "victim", VICTIM_PW)).startswith(BLOCKED)
    assert (await login(relay, "victim", VICTIM_PW)).startswith(BLOCKED)


async def test_failures_count_per_user_across_addresses(relay: Relay, clock: Clock) -> None:
    """Guesses at one user from several addresses block that user (and only that user)."""
    for i in range(LIMIT):
        reply = await login(relay, "victim", f"guess-{i}", source=f"127.0.0.{10 + i}")
        assert reply.startswith("535 5.7.8"), reply
    assert (await login(relay, "victim", VICTIM_PW, source="127.0.0.20")).startswith(BLOCKED)
    assert (await login(relay, "attacker", ATTACKER_PW, source="127.0.0.20")).startswith("235")
    clock.advance(BLOCK + 1)
    assert (await login(relay, "victim", VICTIM_PW, source="127.0.0.20")).startswith("235")


async def test_block_is_checked_before_any_password_on_open_connections(relay: Relay, clock: Clock) -> None:
    early = await session(relay)  # opened before the block
    for i in range(LIMIT):
        assert (await login(relay, "victim", f"guess-{i}")).startswith("535 5.7.8")
    assert (await early.cmd(plain("victim", VICTIM_PW))).startswith(BLOCKED)
    clock.advance(BLOCK + 1)  # the block ends by itself ...
    assert (await early.cmd(plain("victim", VICTIM_PW))).startswith("235")
    await early.close()


async def test_failures_count_per_address_across_user_names(relay: Relay, clock: Clock) -> None:
    """Spraying many user names from one address blocks the address (for AUTH)."""
    for i in range(LIMIT):
        assert (await login(relay, f"user{i}", "x")).startswith("535 5.7.8")
    assert (await login(relay, "attacker", ATTACKER_PW)).startswith(BLOCKED)
    clock.advance(BLOCK + 1)
    assert (await login(relay, "attacker", ATTACKER_PW)).startswith("235")


async def test_success_clears_only_that_users_count(relay: Relay) -> None:
    for i in range(LIMIT - 1):
        assert (await login(relay, "victim", f"guess-{i}")).startswith("535")
    assert (await login(relay, "victim", VICTIM_PW)).startswith("235")  # clears victim's count
    # ... but not the address's: one more failure (any user) reaches the address limit.
    assert (await login(relay, "nobody", "x")).startswith("535")
    assert (await login(relay, "attacker", ATTACKER_PW)).startswith(BLOCKED)


@pytest.mark.relay(
    device=[*DEVICES, {"name": "scanner", "ip_allow": ["127.0.0.1/32"], "allowed_senders": ["s@contoso.com"]}]
)
async def test_block_refuses_auth_not_the_connection(relay: Relay, upstream: RecordingUpstream) -> None:
    """Item 3: an IP-allow-listed device behind a blocked address keeps sending."""
    attacker = await session(relay)
    for i in range(LIMIT):
        assert (await attacker.cmd(plain("victim", f"guess-{i}"))).startswith("535 5.7.8")
    assert (await attacker.cmd(plain("victim", "guess"))).startswith(BLOCKED)
    assert (await attacker.cmd("NOOP")).startswith("250")  # still connected
    await attacker.close()

    scanner = await session(relay)  # a new connection from the blocked address: greeted normally
    assert (await scanner.cmd("MAIL FROM:<s@contoso.com>")).startswith("250")
    assert (await scanner.cmd("RCPT TO:<bob@contoso.com>")).startswith("250")
    assert (await scanner.cmd("DATA")).startswith("354")
    assert (await scanner.cmd(b"Subject: scan\r\n\r\nx\r\n.")).startswith("250 2.0.0")
    await scanner.close()
    [msg] = await upstream.wait_for(1)
    assert msg.mail_from == "s@contoso.com"


async def test_auth_plain_with_another_authorization_identity_is_refused(relay: Relay) -> None:
    """Item 4: RFC 4616 2: the server must not silently act as someone else."""
    c = await session(relay)
    assert (await c.cmd(plain("attacker", ATTACKER_PW, authzid="victim"))).startswith("535 5.7.8")
    assert (await c.cmd("MAIL FROM:<a@contoso.com>")).startswith("530")  # not logged in
    assert (await c.cmd(plain("attacker", ATTACKER_PW, authzid="Attacker"))).startswith("235")
    await c.close()
