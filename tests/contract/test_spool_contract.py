"""The spool contract (relay365/spool/contract.py), every guarantee, against every backend.

Each test gets ``backend`` (conftest.py: memory, sqlite, and PostgreSQL once it exists); a handle is
one process on the shared spool. Times given to ``claim`` are explicit, so leases are tested on a
controlled clock; wake-ups across handles wait with a bounded timeout.
"""

from __future__ import annotations

import asyncio
import functools

import pytest

from relay365.errors import LeaseLost, QueueEntryNotFound
from relay365.spool.contract import Spool
from relay365.spool.model import (
    BodySource,
    Bounce,
    Envelope,
    PaceEvent,
    QueueFilter,
    QueueState,
    RcptState,
    RecipientUpdate,
)
from relay365.spool.wire import normalize, stuff
from tests.contract.conftest import Backend
from tests.support import T0

ENV = Envelope("scanner@contoso.com", ("a@contoso.com", "b@fabrikam.com"), device="printer", peer="10.0.0.9")
BODY = b"Subject: scan\r\nMessage-ID: <scan@contoso.com>\r\n\r\n" + b"line of text\r\n" * 500
LEASE = 60.0


async def queue(spool: Spool, envelope: Envelope = ENV, body: bytes = BODY) -> str:
    """Enqueue in a millisecond of its own: queue ids sort by arrival to the millisecond, and the
    tests name messages in arrival order ("oldest first")."""
    await asyncio.sleep(0.002)
    return await spool.enqueue(envelope, body)


async def claim_ids(spool: Spool, owner: str, now: float = T0, limit: int = 100) -> list[str]:
    return [e.queue_id for e in await spool.claim(owner=owner, now=now, limit=limit, lease=LEASE)]


async def read_body(spool: Spool, queue_id: str) -> bytes:
    async with spool.body(await spool.get(queue_id)) as reader:
        return await reader.read_all()


def delivered(entry_rcpts: tuple[str, ...]) -> list[RecipientUpdate]:
    return [RecipientUpdate(r, RcptState.DELIVERED, "250 2.0.0 Ok") for r in entry_rcpts]


# -- receiving -----------------------------------------------------------------------------------------
async def test_commit_is_durable_and_complete(backend: Backend) -> None:
    spool = await backend.open("node-a")
    msg = spool.incoming()
    for i in range(40):  # streamed: more than one spill
        msg.write(b"Subject: big\r\n\r\n" if i == 0 else b"x" * 8190 + b"\r\n")
        await msg.drain()
    qid = await msg.commit(ENV)
    assert qid == msg.queue_id and len(qid) == 19
    await spool.close()  # the process goes away; what was committed stays

    again = await backend.open()
    entry = await again.get(qid)
    assert entry.envelope == ENV and entry.size == msg.size and entry.received_at == T0
    assert [(r.rcpt, r.state, r.attempts, r.next_attempt) for r in entry.recipients] == [
        ("a@contoso.com", RcptState.QUEUED, 0, T0),
        ("b@fabrikam.com", RcptState.QUEUED, 0, T0),
    ]
    body = await read_body(again, qid)
    assert len(body) == msg.size and body.startswith(b"Subject: big\r\n\r\nxxx")


async def test_abort_leaves_nothing(backend: Backend) -> None:
    spool = await backend.open("node-a")
    msg = spool.incoming()
    msg.write(BODY * 40)
    await msg.drain()
    await msg.abort()
    assert await spool.list() == []
    await backend.crash(spool)
    found = await (await backend.open()).recover("node-b")
    assert found.dead_owners == ("node-a",) and found.bodies_removed == 0  # nothing was left behind


# -- claims and leases ---------------------------------------------------------------------------------
async def test_claim_takes_due_unheld_messages_oldest_due_first(backend: Backend) -> None:
    spool = await backend.open("node-a")
    q1, q2, q3, q4 = [await queue(spool) for _ in range(4)]
    await spool.hold(q3, True)
    later = [RecipientUpdate(r, RcptState.DEFERRED, "451 4.3.0 later", T0 + 600) for r in ENV.rcpt_tos]
    assert await claim_ids(spool, "node-a", limit=1) == [q1]
    await spool.record(q1, later, owner="node-a")
    assert await claim_ids(spool, "node-a", limit=2) == [q2, q4]  # held q3 is skipped
    entry = await spool.get(q2)
    assert (entry.claimed_by, entry.claimed_until) == ("node-a", T0 + LEASE)
    assert await claim_ids(spool, "node-a", now=T0 + LEASE - 1) == []  # q1 not due, q2/q4 claimed
    assert await spool.next_due_time() == T0 + LEASE  # q2/q4's leases end before q1 is due
    assert await claim_ids(spool, "node-a", now=T0 + 600, limit=1) == [q2]  # expired lease, due longest
    await spool.hold(q3, False)
    assert sorted(await claim_ids(spool, "node-a", now=T0 + 600)) == sorted([q1, q3, q4])


async def test_two_owners_never_claim_the_same_message(backend: Backend) -> None:
    """Concurrently, through separate handles (SQLite: separate connections and threads): in each
    round both owners' claims are in flight at once, so every round is a race for the same due
    messages."""
    a, b = await backend.open("node-a"), await backend.open("node-b")
    ids = [await a.enqueue(ENV, BODY) for _ in range(64)]
    got: dict[str, list[str]] = {"node-a": [], "node-b": []}
    rounds = 0
    while True:
        taken_a, taken_b = await asyncio.gather(
            claim_ids(a, "node-a", limit=4), claim_ids(b, "node-b", limit=4)
        )
        if not taken_a and not taken_b:
            break
        rounds += 1
        assert not set(taken_a) & set(taken_b)
        got["node-a"] += taken_a
        got["node-b"] += taken_b
    assert not set(got["node-a"]) & set(got["node-b"])
    assert sorted(got["node-a"] + got["node-b"]) == sorted(ids)  # each exactly once
    assert rounds == len(ids) // 8 and len(got["node-a"]) == len(got["node-b"]) == len(ids) // 2


async def test_lease_expiry_hands_the_message_over_and_the_old_owner_records_nothing(
    backend: Backend,
) -> None:
    a, b = await backend.open("node-a"), await backend.open("node-b")
    qid = await queue(a)
    assert await claim_ids(a, "node-a") == [qid]
    assert await claim_ids(b, "node-b", now=T0 + LEASE - 1) == []  # the lease still runs
    assert await claim_ids(b, "node-b", now=T0 + LEASE) == [qid]  # expired: node-b takes over
    dsn = Bounce(b"Subject: failure\r\n\r\nx\r\n", Envelope("", ("scanner@contoso.com",), is_dsn=True))
    with pytest.raises(LeaseLost):
        await a.record(
            qid,
            [RecipientUpdate("a@contoso.com", RcptState.BOUNCED, "550 5.1.1 unknown")],
            owner="node-a",
            bounce=dsn,
            pace_events=[PaceEvent("mailbox", T0, 1)],
        )
    # Nothing of it was written: no state, no DSN, no pacing event; node-b still holds the claim.
    [entry] = await b.list()
    assert entry.queue_id == qid and entry.claimed_by == "node-b"
    assert {r.state for r in entry.recipients} == {RcptState.QUEUED}
    assert await b.pace_events(0) == []
    await b.record(qid, delivered(ENV.rcpt_tos), owner="node-b")
    assert await b.list() == []


async def test_an_expired_lease_nobody_took_still_records(backend: Backend) -> None:
    """A stalled owner whose lease ran out loses nothing while no other owner took over."""
    a = await backend.open("node-a")
    qid = await queue(a)
    await claim_ids(a, "node-a")
    backend.clock.advance(10 * LEASE)
    await a.record(qid, delivered(ENV.rcpt_tos), owner="node-a")
    assert await a.list() == []


async def test_record_on_a_deleted_message_raises_lease_lost(backend: Backend) -> None:
    a = await backend.open("node-a")
    qid = await queue(a)
    await claim_ids(a, "node-a")
    await a.delete(qid)
    with pytest.raises(LeaseLost):
        await a.record(qid, delivered(ENV.rcpt_tos), owner="node-a")
    assert await a.list() == []


async def test_release_gives_the_claim_back_unchanged(backend: Backend) -> None:
    a, b = await backend.open("node-a"), await backend.open("node-b")
    qid = await queue(a)
    before = await a.get(qid)
    await claim_ids(a, "node-a")
    await b.release(qid, owner="node-b")  # not node-b's claim: nothing happens
    assert (await b.get(qid)).claimed_by == "node-a"
    await a.release(qid, owner="node-a")
    after = await b.get(qid)
    assert after == before  # states, attempts, due times as they were; no claim
    assert await claim_ids(b, "node-b") == [qid]  # due again for everyone at once


async def test_renew_extends_only_the_owners_claims(backend: Backend) -> None:
    a, b = await backend.open("node-a"), await backend.open("node-b")
    q1, q2 = await queue(a), await queue(a)
    await claim_ids(a, "node-a")
    assert await a.renew([q1], owner="node-a", until=T0 + 3 * LEASE) == {q1}
    assert await claim_ids(b, "node-b", now=T0 + 2 * LEASE) == [q2]  # only q2's lease ran out
    assert await a.renew([q1, q2], owner="node-a", until=T0 + 4 * LEASE) == {q1}  # q2 was taken over
    assert await a.renew([], owner="node-a", until=T0) == set()


async def test_recover_cleans_up_after_dead_owners_only(backend: Backend) -> None:
    a, b = await backend.open("node-a"), await backend.open("node-b")
    q1, q2 = await queue(a), await queue(a)
    assert await claim_ids(a, "node-a", limit=1) == [q1]
    await asyncio.sleep(0.002)  # (q3 arrives after q2)
    receiving = a.incoming()  # node-a is receiving a big message: part of it is stored already
    receiving.write(BODY * 200)
    await receiving.drain()

    # node-b starts while node-a lives: nothing of node-a's is touched.
    found = await b.recover("node-b")
    assert found.dead_owners == () and found.bodies_removed == 0 and found.claims_released == 0
    assert (await b.get(q1)).claimed_by == "node-a"
    receiving.write(b"the end\r\n")
    q3 = await receiving.commit(ENV)  # its half-stored body was not removed
    assert (await read_body(b, q3)).endswith(b"the end\r\n")

    # node-a dies mid-delivery and mid-receive.
    assert await claim_ids(a, "node-a", limit=1) == [q2]
    dying = a.incoming()
    dying.write(BODY * 200)
    await dying.drain()
    await backend.crash(a)
    found = await b.recover("node-b")
    assert found.dead_owners == ("node-a",)
    assert (found.bodies_removed, found.claims_released) == (1, 2)
    assert sorted(await claim_ids(b, "node-b")) == sorted([q1, q2, q3])  # at once, not after the lease
    assert (await b.recover("node-b")).dead_owners == ()  # done once
    assert sorted(e.queue_id for e in await b.list()) == sorted([q1, q2, q3])


# -- bodies ------------------------------------------------------------------------------------------
async def test_bodies_are_read_through_the_spool_in_chunks(backend: Backend) -> None:
    spool = await backend.open("node-a")
    message = b"Subject: big\r\n\r\n" + bytes(range(256)) * 4096  # 1 MiB and a bit
    body = stuff(message)  # spooled in wire form: CRLF line ends, dot-stuffed
    qid = await spool.enqueue(ENV, message)
    entry = await spool.get(qid)
    assert entry.stuffed
    async with spool.body(entry) as reader:
        assert reader.size == len(body) == entry.size
        fd = reader.fileno()
        assert fd is None or isinstance(fd, int)
        assert await reader.read(17) == body[:17]
        chunks = [c async for c in reader.chunks(64 * 1024)]
        assert max(len(c) for c in chunks) == 64 * 1024 and len(chunks) == -(-(len(body) - 17) // 65536)
        assert b"".join(chunks) == body[17:]
        assert await reader.read(10) == b""
        assert await reader.read_all() == body
    [claimed] = await spool.claim(owner="node-a", now=T0, limit=1, lease=LEASE)
    async with spool.body(claimed) as reader:  # a claimed entry's body, as the scheduler reads it
        assert await reader.read_all() == body
    source = BodySource(qid, claimed.size, functools.partial(spool.body, claimed), claimed.stuffed)
    assert await source.read_all() == normalize(message)  # what Graph and the console read


async def test_bodies_are_kept_byte_for_byte_in_wire_form(backend: Backend) -> None:
    """What ingress writes is what delivery reads: the wire form, never stuffed or unstuffed again."""
    spool = await backend.open("node-a")
    wire = b"Subject: dots\r\n\r\n..a line that starts with a dot\r\nlast\r\n"
    msg = spool.incoming()
    msg.write(wire)
    qid = await msg.commit(ENV)
    entry = await spool.get(qid)
    assert entry.stuffed and entry.size == len(wire)
    assert await read_body(spool, qid) == wire
    source = BodySource(qid, entry.size, functools.partial(spool.body, entry), entry.stuffed)
    assert await source.read_all() == wire.replace(b"\r\n..", b"\r\n.")


# -- recording outcomes ------------------------------------------------------------------------------
async def test_record_writes_states_dsn_and_pacing_in_one_go(backend: Backend) -> None:
    spool = await backend.open("node-a")
    qid = await queue(spool)
    await claim_ids(spool, "node-a")
    dsn_env = Envelope("", ("scanner@contoso.com",), device="relay365", is_dsn=True)
    await spool.record(
        qid,
        [
            RecipientUpdate("a@contoso.com", RcptState.BOUNCED, "550 5.1.1 unknown"),
            RecipientUpdate("b@fabrikam.com", RcptState.DEFERRED, "451 4.7.500 busy", T0 + 300),
        ],
        owner="node-a",
        bounce=Bounce(b"Subject: Undelivered Mail\r\n\r\nsorry\r\n", dsn_env),
        pace_events=[PaceEvent("mbx@contoso.com", T0, 2)],
    )
    entries = {e.queue_id: e for e in await spool.list()}
    assert len(entries) == 2 and qid in entries
    [dsn_id] = set(entries) - {qid}
    assert entries[dsn_id].envelope == dsn_env
    assert await read_body(spool, dsn_id) == b"Subject: Undelivered Mail\r\n\r\nsorry\r\n"
    got = {r.rcpt: (r.state, r.attempts, r.next_attempt) for r in entries[qid].recipients}
    assert got == {
        "a@contoso.com": (RcptState.BOUNCED, 1, 0.0),
        "b@fabrikam.com": (RcptState.DEFERRED, 1, T0 + 300),
    }
    assert entries[qid].claimed_by == ""  # record ended the claim
    assert await spool.pace_events(T0) == [PaceEvent("mbx@contoso.com", T0, 2)]
    assert await spool.pace_events(T0 + 1) == []
    await spool.close()
    again = await backend.open("node-b")
    assert await again.pace_events(T0 - 86_400) == [PaceEvent("mbx@contoso.com", T0, 2)]
    # A final state stays final; the entry goes when no recipient is open.
    await claim_ids(again, "node-b", now=T0 + 300)
    await again.record(
        qid,
        [
            RecipientUpdate("a@contoso.com", RcptState.DELIVERED, "250 late"),
            RecipientUpdate("b@fabrikam.com", RcptState.DELIVERED, "250 ok"),
        ],
        owner="node-b",
    )
    assert [e.queue_id for e in await again.list()] == [dsn_id]
    with pytest.raises(QueueEntryNotFound):
        await again.get(qid)


async def test_paced_updates_do_not_count_as_attempts(backend: Backend) -> None:
    spool = await backend.open("node-a")
    qid = await queue(spool)
    await claim_ids(spool, "node-a")
    paced = [RecipientUpdate(r, RcptState.QUEUED, "", T0 + 2, counts_attempt=False) for r in ENV.rcpt_tos]
    await spool.record(qid, paced, owner="node-a")
    assert {(r.attempts, r.next_attempt) for r in (await spool.get(qid)).recipients} == {(0, T0 + 2)}


# -- wake-ups ----------------------------------------------------------------------------------------
async def test_wake_ups_in_the_same_process(backend: Backend) -> None:
    spool = await backend.open("node-a")
    assert await spool.wait_changed(0.05) is False  # nothing happened yet
    qid = await queue(spool)
    assert await spool.wait_changed(5) is True  # new mail
    assert await spool.wait_changed(0.05) is False  # reported once
    await claim_ids(spool, "node-a")
    assert await spool.wait_changed(0.05) is False  # a claim is not news
    await spool.release(qid, owner="node-a")
    assert await spool.wait_changed(5) is True
    await spool.hold(qid, True)
    await spool.hold(qid, False)
    assert await spool.wait_changed(5) is True
    generation = spool.flush_generation()
    await spool.retry(qid, T0)
    assert await spool.wait_changed(5) is True and spool.flush_generation() == generation + 1
    await spool.request_flush()
    assert await spool.wait_changed(5) is True and spool.flush_generation() == generation + 2
    assert await spool.retry_matching(QueueFilter(), T0) == 1
    assert await spool.wait_changed(5) is True and spool.flush_generation() == generation + 3


async def test_wake_ups_from_another_process(backend: Backend) -> None:
    server, admin = await backend.open("node-a"), await backend.open()
    assert await server.wait_changed(0.05) is False
    waiting = asyncio.create_task(server.wait_changed(10))
    await asyncio.sleep(0.05)
    qid = await queue(admin)  # e.g. another worker took a message
    assert await waiting is True
    generation = server.flush_generation()
    await admin.retry(qid, T0)  # `relay365 queue retry` from the command line
    assert await server.wait_changed(10) is True
    assert server.flush_generation() == generation + 1


# -- administration ----------------------------------------------------------------------------------
async def test_query_filters_hold_retry_delete(backend: Backend) -> None:
    spool = await backend.open("node-a")
    q1 = await queue(spool)
    q2 = await queue(spool, Envelope("app@fabrikam.com", ("x@contoso.com",), device="erp"))
    q3 = await queue(spool, Envelope("", ("scanner@contoso.com",), device="relay365", is_dsn=True))
    await claim_ids(spool, "node-a", limit=1)
    await spool.record(
        q1,
        [RecipientUpdate("b@fabrikam.com", RcptState.DEFERRED, "451 busy", T0 + 900)],
        owner="node-a",
    )
    await spool.hold(q2, True)

    async def ids(**where: object) -> list[str]:
        page = await spool.query(QueueFilter(**where), limit=None)  # type: ignore[arg-type]
        assert page.total == len(page.entries)
        return [e.queue_id for e in page.entries]

    assert await ids() == [q1, q2, q3]
    assert await ids(state=QueueState.DEFERRED) == [q1]
    assert await ids(state=QueueState.QUEUED) == [q1, q2, q3]
    assert await ids(state=QueueState.HELD) == [q2]
    assert await ids(device="erp") == [q2]
    assert await ids(sender="<>") == [q3]
    assert await ids(sender="@FABRIKAM.com") == [q2]
    assert await ids(sender="scan*") == [q1]
    assert await ids(recipient="@fabrikam.com") == [q1]
    assert await ids(recipient="@fabrikam.com", state=QueueState.QUEUED) == []  # same recipient
    assert await ids(recipient="*@contoso.com", device="printer") == [q1]
    page = await spool.query(QueueFilter(), limit=2)
    assert [e.queue_id for e in page.entries] == [q1, q2] and page.total == 3

    stats = await spool.stats()
    assert stats.recipients == {"queued": 3, "deferred": 1, "delivered": 0, "bounced": 0}
    assert (stats.held, stats.oldest) == (1, T0)

    assert await spool.retry_matching(QueueFilter(state=QueueState.DEFERRED), T0 + 5) == 1
    assert {r.next_attempt for r in (await spool.get(q1)).recipients} == {T0 + 5}
    await spool.retry(q2, T0 + 7)  # held messages stay held
    assert (await spool.get(q2)).held and await claim_ids(spool, "node-a", now=T0 + 10) == [q3, q1]
    await spool.delete(q2)
    for op in (spool.get(q2), spool.hold(q2, False), spool.retry(q2, T0), spool.delete(q2)):
        with pytest.raises(QueueEntryNotFound):
            await op
    assert [e.queue_id for e in await spool.list()] == [q1, q3]
