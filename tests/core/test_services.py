"""The three services (issue 9 item 1): each one alone behind its own seam, and the relay composing them
in one exit stack, where a failure while starting closes everything started before it."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import smtplib
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from relay365.admin.accounts import AccountStore
from relay365.admin.ports import ConsoleDeps, TransportStatus
from relay365.admin.service import AdminService
from relay365.delivery.service import DeliveryService
from relay365.ingress.service import IngressService
from relay365.observability.activity import DeviceActivity
from relay365.observability.metrics import Metrics
from relay365.observability.tracking import MemoryTrackingLog
from relay365.service.relay import Relay
from relay365.spool.memory import MemorySpool
from relay365.spool.model import Envelope, QueuePage, QueueQuery, QueueStats
from relay365.transports.registry import build_transport
from tests.support import RawSMTP, RecordingUpstream, free_port, make_settings, smarthost, wait_gone

NO_TLS = {"name": "lan", "port": 0, "tls": "none"}
MESSAGE = b"From: scanner@contoso.com\r\nSubject: scan\r\n\r\nhello\r\n"


@contextlib.contextmanager
def port_in_use() -> Iterator[int]:
    """A port something else listens on (the relay cannot bind it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def owner_lock_free(spool_dir: Path, owner: str) -> bool:
    """The spool's owner lock of ``owner`` can be taken: its spool handle is closed (sqlite_owners.py)."""
    fd = os.open(spool_dir / "owners" / f"{owner}.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def other_tasks() -> set[asyncio.Task[object]]:
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]


# -- the composition: a failure while starting closes what was started ----------------------------------
async def test_a_listener_port_in_use_closes_what_was_started(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    """The second listener's port is taken: serve fails with the OSError, and the first listener, the
    scheduler task, the transports and the spool (its owner lock) are all closed again."""
    first = free_port()
    with port_in_use() as taken:
        lan = {"name": "lan", "port": first, "tls": "none"}
        settings = make_settings(
            tmp_path,
            listener=[lan, {"name": "submission", "port": taken, "tls": "none"}],
            transport=[smarthost(upstream.port)],
        )
        relay = Relay(settings)
        with pytest.raises(OSError):
            await relay.start()
    assert relay.ingress is None and relay.delivery is not None  # ingress never came up
    assert refused(first)
    assert not relay.delivery.running() and relay.delivery.transports == {}
    assert owner_lock_free(settings.server.spool_dir, relay.owner)
    assert other_tasks() == set()
    await relay.stop()  # nothing left to stop
    # The same spool starts cleanly afterwards and the relay works.
    async with Relay(
        make_settings(tmp_path, listener=[NO_TLS], transport=[smarthost(upstream.port)])
    ) as again:
        await asyncio.to_thread(_send, again.ports["lan"])
        await upstream.wait_for(1)


async def test_the_admin_port_in_use_closes_listeners_and_delivery(tmp_path: Path) -> None:
    with port_in_use() as taken:
        settings = make_settings(tmp_path, listener=[NO_TLS], admin={"address": "127.0.0.1", "port": taken})
        relay = Relay(settings)
        with pytest.raises(OSError, match=r"admin endpoint 127\.0\.0\.1:\d+: Address already in use"):
            await relay.start()
    assert relay.ingress is not None and relay.delivery is not None and relay.admin is None
    assert refused(relay.ingress.ports["lan"]) and not relay.delivery.running()
    assert relay.delivery.transports == {}
    assert owner_lock_free(settings.server.spool_dir, relay.owner)
    assert other_tasks() == set()


async def test_the_relay_is_an_async_context_manager(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, listener=[NO_TLS])
    async with Relay(settings) as relay:
        assert relay.healthy() and relay.ports["lan"] > 0
        assert not owner_lock_free(settings.server.spool_dir, relay.owner)
        with pytest.raises(RuntimeError, match="already running"):
            await relay.start()
    assert not relay.healthy() and refused(relay.ports["lan"])
    assert owner_lock_free(settings.server.spool_dir, relay.owner)
    assert other_tasks() == set()


# -- each service alone ---------------------------------------------------------------------------------
def _send(port: int, rcpt: str = "alice@contoso.com") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.sendmail("scanner@contoso.com", [rcpt], MESSAGE)


async def test_ingress_service_alone(tmp_path: Path) -> None:
    """Ingress needs a spool and a wake-up, not the relay: it binds, queues with 250 after the
    commit, tells ``on_queued``, counts connections, and says 421 to an open session on the way out."""
    settings = make_settings(tmp_path, listener=[NO_TLS])
    spool = MemorySpool()
    await spool.open()
    queued: list[str] = []
    metrics = Metrics()
    ingress = IngressService(
        settings=settings,
        spool=spool,
        metrics=metrics,
        tracking=MemoryTrackingLog(),
        activity=DeviceActivity(),
        on_queued=queued.append,
    )
    ingress.grace = 5
    async with ingress:
        port = ingress.ports["lan"]
        await asyncio.to_thread(_send, port)
        assert len(queued) == 1 and (await spool.get(queued[0])).envelope.rcpt_tos == ("alice@contoso.com",)
        idle = await RawSMTP.connect(port)
        assert (await idle.reply()).startswith("220")
        assert ingress.connections() == 1
        ingress.refresh_metrics()
        assert b"relay365_connections 1.0" in metrics.exposition()
    assert (await idle.reply()).startswith("421 4.3.2")
    await idle.close()
    assert refused(port) and ingress.connections() == 0
    await spool.close()


async def test_delivery_service_alone(tmp_path: Path, upstream: RecordingUpstream) -> None:
    """Delivery needs a spool and transports, not the relay: it delivers what is queued, reports its
    status, and closes (and gives back) the transports on the way out."""
    settings = make_settings(tmp_path, transport=[smarthost(upstream.port)])
    spool = MemorySpool()
    await spool.open()
    await spool.recover("delivery-test")  # this process's owner id, as the composition root does
    transports = {t.name: build_transport(t, hostname="relay.test") for t in settings.transports}
    delivery = DeliveryService(
        settings=settings,
        spool=spool,
        transports=transports,
        owner="delivery-test",
        metrics=Metrics(),
        tracking=MemoryTrackingLog(),
    )
    assert delivery.route_reply("", "bob@contoso.com", "local") is None  # a smarthost carries <>
    async with delivery:
        assert delivery.running() and delivery.delivery_stopped() is None and delivery.suspended() == {}
        qid = await spool.enqueue(Envelope("scanner@contoso.com", ("alice@contoso.com",)), MESSAGE)
        delivery.wake(qid)
        [received] = await upstream.wait_for(1)
        assert received.rcpt_tos == ["alice@contoso.com"] and received.content.endswith(b"hello\r\n")
        await wait_gone(spool, qid)
    assert not delivery.running() and transports == {}
    await spool.close()


class _Status:
    """A StatusSource with no relay behind it: the console depends on this interface only."""

    def now(self) -> float:
        return 1_000_000.0

    def listeners(self) -> dict[str, int]:
        return {"lan": 2525}

    def connections(self) -> int:
        return 3

    def delivery_stopped(self) -> str | None:
        return None

    async def transports(self) -> list[TransportStatus]:
        return [TransportStatus("up", "smarthost", "ok")]

    async def metrics(self) -> bytes:
        return b"# nothing\n"


class _Queue:
    def __init__(self, spool: MemorySpool) -> None:
        self._spool = spool

    async def browse(self, query: QueueQuery) -> QueuePage:
        return await self._spool.query(query.where, limit=query.limit, order=query.order, cursor=query.cursor)

    async def get(self, queue_id: str):  # type: ignore[no-untyped-def]
        return await self._spool.get(queue_id)

    async def head(self, queue_id: str) -> bytes:
        return b""

    async def raw(self, queue_id: str) -> AsyncIterator[bytes]:
        yield b""

    async def hold(self, queue_id: str, held: bool) -> None:
        await self._spool.hold(queue_id, held)

    async def retry(self, queue_id: str) -> None:
        await self._spool.retry(queue_id, 0.0)

    async def delete(self, queue_id: str) -> None:
        await self._spool.delete(queue_id)

    async def stats(self) -> QueueStats:
        return await self._spool.stats()


async def test_admin_service_alone(tmp_path: Path) -> None:
    """The console runs from its ports (status, queue, tracking, devices) alone: no relay, no ingress,
    no delivery behind it."""
    settings = make_settings(tmp_path, admin={"address": "127.0.0.1", "port": 0})
    spool = MemorySpool()
    await spool.open()
    accounts = AccountStore(tmp_path / "admin-users.json")
    deps = ConsoleDeps(
        status=_Status(), queue=_Queue(spool), tracking=MemoryTrackingLog(), devices=DeviceActivity()
    )
    async with AdminService(deps=deps, settings=settings.admin, accounts=accounts) as admin:
        assert admin.port > 0 and admin.url == f"http://127.0.0.1:{admin.port}/"
        async with httpx.AsyncClient(base_url=admin.url, trust_env=False, timeout=10) as http:
            health = (await http.get("/api/health")).json()
            assert health["listeners"] == {"lan": 2525} and health["connections"] == 3
            assert (await http.get("/metrics")).text == "# nothing\n"
    assert refused(admin.port)
    await spool.close()
