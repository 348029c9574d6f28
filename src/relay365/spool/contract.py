"""The spool contract: what every backend (SQLite, in-memory, PostgreSQL) guarantees, method by method.

The spool is the relay's only shared state: ingress writes messages into it, delivery claims them,
records outcomes and DSNs, admin tools inspect and change the queue. Several processes (workers,
relays on other hosts with PostgreSQL) may use one spool at once; each delivering process is an
**owner** (``model.new_owner_id()``: unique per process incarnation).

Durability: a method that writes is durable when it returns (SQLite: fsync of the files and a
``synchronous=FULL`` WAL commit; PostgreSQL: COMMIT with ``synchronous_commit`` on). A method that
raises wrote nothing (one transaction), so it may be retried unless its docstring says otherwise.

Errors (``relay365.errors``): ``SpoolFullError`` (no space; ingress answers 452 4.3.1) and
``SpoolIOError`` (any other failure of the storage; 451 4.3.0), both ``SpoolError``;
``QueueEntryNotFound`` for an unknown queue id; ``LeaseLost`` when an owner's claim on a message
was taken over (or the message deleted) before it recorded the outcome.

Claims and leases: ``claim`` hands each due message to exactly one owner, with a lease (an expiry
time). The owner renews the lease while a delivery runs and ends the claim with ``record`` (the
outcome) or ``release`` (no outcome, e.g. at shutdown). A claim whose lease has expired may be taken
by another owner; until that happens the first owner still holds it and may record (so a process
that stalled past its lease loses nothing when nobody else was there to take over). An owner that
is *provably* dead (SQLite: its lock file is no longer locked) has its claims released and its
half-written bodies removed by ``recover``; an owner that is merely slow is never touched.
The one duplicate this allows: a message whose owner died or stalled after the upstream accepted it
and before ``record`` is delivered again by the next owner (at-least-once, RFC 5321 section 6.1).

Wake-ups: ``wait_changed`` returns when new mail was committed, a claim released, a message
released from hold or made due by an admin, or a flush requested, in this process at once and in
another process on the same spool within a short poll (SQLite: ``PRAGMA data_version``;
PostgreSQL: LISTEN/NOTIFY). ``flush_generation`` counts "retry now" requests (``relay365 queue
retry``) so every process can lift the upstreams it holds back.

Bodies are read through the spool (``body``), never by path: the backend decides where bytes live.
A body is the message in wire form (dot-stuffed, ``spool/wire.py``), stored and read back byte for
byte: SMTP delivery sends it as it lies. Ingress writes that form, ``Bounce.body`` arrives in it, and
``enqueue`` makes it (``wire.stuff``) from the message it is given; entries report it in
``QueueEntry.stuffed`` (False only for the SQLite entries of relay365 before it).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from relay365.spool.model import (
    BodyReader,
    Bounce,
    Envelope,
    IncomingMessage,
    PaceEvent,
    QueueEntry,
    QueueFilter,
    QueueOrder,
    QueuePage,
    QueueStats,
    RecipientUpdate,
)

__all__ = ["BodyReader", "IncomingMessage", "QueueAdmin", "Recovery", "Spool"]


@dataclass(frozen=True, slots=True)
class Recovery:
    """What ``recover`` cleaned up after dead owners."""

    dead_owners: tuple[str, ...] = ()
    bodies_removed: int = 0
    claims_released: int = 0


class QueueAdmin(Protocol):
    """The queue as the admin tools see it (``relay365 queue``, ``/api/queue``, ``doctor``): reads
    and the operator's changes. Every change is durable when it returns."""

    async def get(self, queue_id: str) -> QueueEntry:
        """One entry; ``QueueEntryNotFound`` if there is none."""
        ...

    async def query(
        self,
        where: QueueFilter,
        *,
        limit: int | None,
        order: QueueOrder = "oldest",
        cursor: str | None = None,
    ) -> QueuePage:
        """The entries matching ``where`` (``min_age`` counted on the spool's clock), ``limit`` at a
        time (None: all), oldest or newest first, after the queue id ``cursor`` (the previous page's
        ``next_cursor``), and how many match in all, from one consistent snapshot."""
        ...

    async def list(self) -> list[QueueEntry]:
        """Every entry, oldest first (tests and small queues; tools use ``query`` with a limit)."""
        ...

    async def stats(self) -> QueueStats:
        """Recipients per state, held messages, the oldest open message (monitoring)."""
        ...

    async def hold(self, queue_id: str, held: bool) -> None:
        """Hold (no delivery until released) or release a message; a message being delivered
        finishes that attempt. Releasing wakes the delivering processes. ``QueueEntryNotFound``."""

    async def retry(self, queue_id: str, now: float) -> None:
        """Make every open recipient of the message due at ``now`` and request a flush (lifting
        held-back upstreams everywhere). Held messages stay held. ``QueueEntryNotFound``."""

    async def retry_matching(self, where: QueueFilter, now: float) -> int:
        """``retry`` for every matching message in one transaction; returns how many matched."""
        ...

    async def delete(self, queue_id: str) -> None:
        """Remove the message and its body without a DSN. A delivery under way loses its claim
        (its ``record`` raises ``LeaseLost``). ``QueueEntryNotFound``."""

    async def request_flush(self) -> None:
        """ "Retry now": bump the flush generation and wake every delivering process, which stops
        holding back unreachable upstreams (Postfix: ``postqueue -f``)."""


class Spool(QueueAdmin, Protocol):
    """The whole contract: lifecycle, receiving, claiming and recording, bodies, wake-ups."""

    async def open(self) -> None:
        """Connect (create the storage if needed). Touches no other process's state: admin tools
        open the spool while the server runs."""

    async def close(self) -> None:
        """Release everything this handle holds: its owner lock (so the owner is dead from now on;
        its unreleased claims go to the next ``recover`` or expire), connections and threads."""

    async def recover(self, owner: str) -> Recovery:
        """Start working as ``owner`` (a delivering process calls it once, after ``open`` and before
        ``incoming``/``claim``): from now until ``close`` the spool can tell ``owner`` is alive. Then
        clean up after owners that are provably dead: remove their half-written bodies and release
        their claims. Live owners (other workers, other nodes) are never touched. Idempotent; may be
        called again at any time (a supervisor after a worker died)."""
        ...

    # -- receiving -----------------------------------------------------------------------------------
    def incoming(self) -> IncomingMessage:
        """A new message (no I/O until it is drained or committed). ``SpoolFullError`` when free
        space is already below the reserve."""
        ...

    def check_room(self, size: int = 0) -> None:
        """``SpoolFullError`` if storing ``size`` more bytes would cut into the free-space reserve
        kept for the queue's own bookkeeping (delivery outcomes, DSNs). Cheap: ingress calls it at
        MAIL with the announced SIZE (RFC 1870 6.1)."""

    async def enqueue(self, envelope: Envelope, body: bytes) -> str:
        """``incoming`` + ``write`` + ``commit`` for a message already in memory (the message itself:
        it is stored in wire form, ``spool/wire.stuff``)."""
        ...

    # -- delivery ------------------------------------------------------------------------------------
    async def claim(self, *, owner: str, now: float, limit: int, lease: float) -> list[QueueEntry]:
        """Atomically take up to ``limit`` due messages for ``owner``: not held, with an open
        recipient whose ``next_attempt <= now``, and unclaimed or with an expired lease (oldest due
        first). Each is claimed until ``now + lease``. Two owners never get the same message while
        its lease runs, whatever their timing. Visible to every process on return. A backend whose
        storage lives on the owners' own host (SQLite) may commit claims, renewals and releases
        without waiting for stable storage: a crash that loses one ends its owner too. A networked
        backend (PostgreSQL) must not. Retrying after an error is safe (nothing was claimed)."""
        ...

    async def renew(self, queue_ids: Sequence[str], *, owner: str, until: float) -> set[str]:
        """Extend ``owner``'s claims to ``until``; returns the ids it still holds (the others were
        taken over or deleted: their outcome will not be recorded)."""
        ...

    async def record(
        self,
        queue_id: str,
        updates: Sequence[RecipientUpdate],
        *,
        owner: str,
        bounce: Bounce | None = None,
        pace_events: Sequence[PaceEvent] = (),
    ) -> None:
        """Write one attempt's outcome and end the claim, in one transaction: the recipients'
        new states (a final state is never changed again), the DSN ``bounce`` as a new queue entry,
        the pacing events; the entry and its body go when no recipient is left open. Only while
        ``owner`` holds the claim (an expired lease nobody took over still counts): otherwise
        ``LeaseLost`` and nothing is written. Outcomes and DSNs may use the free-space reserve.
        Durable on return. On ``SpoolError`` nothing was written and the call may be repeated
        later (the ``OutcomeRecorder`` does)."""

    async def release(self, queue_id: str, *, owner: str) -> None:
        """Give ``owner``'s claim back without an outcome (shutdown, a delivery never started): the
        message is due again for everyone at once. No-op when the claim is no longer held."""

    async def next_due_time(self) -> float | None:
        """When the next message becomes claimable (its earliest open recipient's ``next_attempt``,
        or its lease's end if later); None when nothing is open and unheld."""
        ...

    def body(self, entry: QueueEntry) -> AbstractAsyncContextManager[BodyReader]:
        """Open the body of ``entry`` (as returned by this spool) for reading. ``SpoolIOError`` when
        it cannot be read (the message names the queue id and the error)."""
        ...

    async def pace_events(self, since: float) -> list[PaceEvent]:
        """Pacing events recorded at or after ``since`` (pacing windows survive restarts)."""
        ...

    # -- wake-ups ------------------------------------------------------------------------------------
    async def wait_changed(self, max_wait: float) -> bool:
        """Wait up to ``max_wait`` seconds for a change since this method last returned True (or
        since ``open``): new mail, a released claim or hold, a retry or a flush request, from this
        handle at once or from another process within the backend's poll. True if something
        changed, False on timeout. One waiter per handle."""
        ...

    def flush_generation(self) -> int:
        """How many flushes were requested (``request_flush``, ``retry``) as last seen by this handle:
        read at ``open`` and refreshed when ``wait_changed`` sees a change. Never decreases."""
        ...
