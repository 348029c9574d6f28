"""The in-memory spool: the same contract as SQLite (spool/contract.py), nothing on disk.

The test double beside the seam: the contract suite runs against it like every other backend, and
unit tests of the scheduler use it instead of files and fsyncs. "Durable" here means: in the
``MemoryStore``, which every handle opened on it shares (each handle stands for one process; a
handle's ``close`` is that process's death, as with SQLite's lock files). Nothing survives the
Python process: ``[spool] url = "memory:"`` is for tests, never for a relay that keeps mail.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase

from relay365.errors import LeaseLost, QueueEntryNotFound, SpoolIOError
from relay365.spool.contract import Recovery
from relay365.spool.model import (
    FINAL_STATES,
    BodyReader,
    Bounce,
    Envelope,
    PaceEvent,
    QueueEntry,
    QueueFilter,
    QueueOrder,
    QueuePage,
    QueueState,
    QueueStats,
    RcptState,
    Recipient,
    RecipientUpdate,
    new_owner_id,
    new_queue_id,
)
from relay365.spool.wire import stuff

_OPEN = (RcptState.QUEUED, RcptState.DEFERRED)
PACING_HISTORY = 86_400.0


@dataclass
class _Message:
    entry: QueueEntry
    body: bytes


@dataclass
class MemoryStore:
    """What a memory spool holds, shared by every handle opened on it."""

    messages: dict[str, _Message] = field(default_factory=dict)
    pacing: list[PaceEvent] = field(default_factory=list)
    flush_generation: int = 0
    live: set[str] = field(default_factory=set)  # owners with an open handle
    known: set[str] = field(default_factory=set)  # every owner ever attached
    partial: dict[str, dict[str, int]] = field(default_factory=dict)  # owner -> spilled bodies (size)
    handles: list[MemorySpool] = field(default_factory=list)

    def notify(self) -> None:
        for handle in self.handles:
            handle._notify()


class BytesReader:
    """A body held in memory, read like a file."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self.size = len(data)
        self._pos = 0

    async def read(self, n: int = -1) -> bytes:
        end = self.size if n < 0 else min(self.size, self._pos + n)
        data = bytes(self._data[self._pos : end])
        self._pos = end
        return data

    async def chunks(self, n: int = 256 * 1024) -> AsyncIterator[bytes]:
        while chunk := await self.read(n):
            yield chunk

    async def read_all(self) -> bytes:
        self._pos = self.size
        return bytes(self._data)

    def fileno(self) -> int | None:
        return None


class MemoryIncoming:
    SPILL = 128 * 1024

    def __init__(self, spool: MemorySpool, owner: str) -> None:
        self._spool = spool
        self._owner = owner
        self.queue_id = new_queue_id()
        self.size = 0
        self._parts: list[bytes] = []
        self._spilled = False
        self._done = False

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self.size += len(data)

    async def drain(self) -> None:
        if self._done:
            raise SpoolIOError(f"message {self.queue_id} was aborted")
        if self.size >= self.SPILL:  # what a file backend would have written by now
            self._spool.check_room(self.size)
            self._spool.store.partial.setdefault(self._owner, {})[self.queue_id] = self.size
            self._spilled = True

    async def commit(self, envelope: Envelope) -> str:
        if self._done:
            raise SpoolIOError(f"message {self.queue_id} was aborted")
        self._spool._check_open()
        self._drop_partial()
        self._done = True
        self._spool._insert(self.queue_id, envelope, b"".join(self._parts))
        self._parts = []
        self._spool.store.notify()
        return self.queue_id

    async def abort(self) -> None:
        self._done = True
        self._parts = []
        self._drop_partial()

    def _drop_partial(self) -> None:
        if self._spilled:
            self._spool.store.partial.get(self._owner, {}).pop(self.queue_id, None)


class MemorySpool:
    def __init__(
        self, store: MemoryStore | None = None, *, clock: Callable[[], float] = lambda: 0.0, min_free: int = 0
    ) -> None:
        self.store = store if store is not None else MemoryStore()
        self._clock = clock
        self.min_free = min_free  # not enforced: memory has no free-space reserve
        self._owner: str | None = None
        self._open = False
        self._changed: asyncio.Event | None = None
        self._flush_seen = 0

    # -- lifecycle and owners --------------------------------------------------------------------
    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _check_open(self) -> None:
        if not self._open:
            raise SpoolIOError("spool I/O error: the memory spool is closed")

    async def open(self) -> None:
        self._open = True
        self._changed = asyncio.Event()
        self._flush_seen = self.store.flush_generation
        self.store.handles.append(self)

    async def close(self) -> None:
        self._open = False
        if self in self.store.handles:
            self.store.handles.remove(self)
        if self._owner is not None:
            self.store.live.discard(self._owner)

    @property
    def owner(self) -> str | None:
        return self._owner

    def _attach(self, owner: str | None = None) -> str:
        self._check_open()
        if self._owner is None:
            self._owner = owner or new_owner_id()
            self.store.live.add(self._owner)
            self.store.known.add(self._owner)
        elif owner is not None and owner != self._owner:
            raise ValueError(f"this spool handle works as {self._owner}, not {owner}")
        return self._owner

    async def recover(self, owner: str) -> Recovery:
        me = self._attach(owner)
        dead = sorted(self.store.known - self.store.live - {me})
        removed = sum(len(self.store.partial.pop(o, {})) for o in dead)
        released = 0
        for m in self.store.messages.values():
            if m.entry.claimed_by in dead:
                m.entry = replace(m.entry, claimed_by="", claimed_until=0.0)
                released += 1
        self.store.known -= set(dead)
        if released:
            self.store.notify()
        return Recovery(tuple(dead), removed, released)

    # -- receiving -------------------------------------------------------------------------------
    def check_room(self, size: int = 0) -> None:
        self._check_open()

    def incoming(self) -> MemoryIncoming:
        return MemoryIncoming(self, self._attach())

    async def enqueue(self, envelope: Envelope, body: bytes) -> str:
        msg = self.incoming()
        msg.write(stuff(body))
        return await msg.commit(envelope)

    def _insert(self, queue_id: str, env: Envelope, body: bytes) -> None:
        now = self._clock()
        rcpts = tuple(Recipient(r, RcptState.QUEUED, 0, now, "") for r in env.rcpt_tos)
        entry = QueueEntry(queue_id, env, len(body), now, False, rcpts)
        self.store.messages[queue_id] = _Message(entry, body)

    # -- delivery --------------------------------------------------------------------------------
    def _get(self, queue_id: str) -> _Message:
        self._check_open()
        try:
            return self.store.messages[queue_id]
        except KeyError:
            raise QueueEntryNotFound(queue_id) from None

    @staticmethod
    def _due_at(e: QueueEntry) -> float | None:
        times = [r.next_attempt for r in e.recipients if r.state in _OPEN]
        return min(times) if times and not e.held else None

    async def claim(self, *, owner: str, now: float, limit: int, lease: float) -> list[QueueEntry]:
        self._attach(owner)
        due = []
        for m in self.store.messages.values():
            t = self._due_at(m.entry)
            if t is not None and t <= now and (not m.entry.claimed_by or m.entry.claimed_until <= now):
                due.append((t, m))
        due.sort(key=lambda x: (x[0], x[1].entry.queue_id))
        taken = []
        for _, m in due[: max(0, limit)]:
            m.entry = replace(m.entry, claimed_by=owner, claimed_until=now + lease)
            taken.append(m.entry)
        return taken

    async def renew(self, queue_ids: Sequence[str], *, owner: str, until: float) -> set[str]:
        self._check_open()
        held = set()
        for qid in queue_ids:
            m = self.store.messages.get(qid)
            if m is not None and m.entry.claimed_by == owner:
                m.entry = replace(m.entry, claimed_until=until)
                held.add(qid)
        return held

    async def release(self, queue_id: str, *, owner: str) -> None:
        self._check_open()
        m = self.store.messages.get(queue_id)
        if m is not None and m.entry.claimed_by == owner:
            m.entry = replace(m.entry, claimed_by="", claimed_until=0.0)
            self.store.notify()

    async def next_due_time(self) -> float | None:
        self._check_open()
        times = []
        for m in self.store.messages.values():
            t = self._due_at(m.entry)
            if t is not None:
                times.append(max(t, m.entry.claimed_until) if m.entry.claimed_by else t)
        return min(times) if times else None

    async def record(
        self,
        queue_id: str,
        updates: Sequence[RecipientUpdate],
        *,
        owner: str,
        bounce: Bounce | None = None,
        pace_events: Sequence[PaceEvent] = (),
    ) -> None:
        self._check_open()
        m = self.store.messages.get(queue_id)
        if m is None or m.entry.claimed_by != owner:
            holder = "deleted" if m is None else f"claimed by {m.entry.claimed_by or 'nobody'}"
            raise LeaseLost(f"{queue_id} is no longer claimed by {owner} ({holder})")
        by_rcpt = {u.rcpt: u for u in updates}
        rcpts = []
        for r in m.entry.recipients:
            u = by_rcpt.get(r.rcpt)
            if u is None or r.state not in _OPEN:
                rcpts.append(r)
            else:
                attempts = r.attempts + int(u.counts_attempt)
                rcpts.append(
                    Recipient(
                        r.rcpt, u.state, attempts, u.next_attempt, u.reply[:1000], u.transport or r.transport
                    )
                )
        if bounce is not None:
            self._insert(new_queue_id(), bounce.envelope, bounce.body)
        self.store.pacing += pace_events
        cutoff = self._clock() - PACING_HISTORY
        self.store.pacing = [e for e in self.store.pacing if e.at >= cutoff]
        if all(r.state in FINAL_STATES for r in rcpts):
            del self.store.messages[queue_id]
        else:
            m.entry = replace(m.entry, recipients=tuple(rcpts), claimed_by="", claimed_until=0.0)
        if bounce is not None:
            self.store.notify()

    @contextlib.asynccontextmanager
    async def _open_body(self, entry: QueueEntry) -> AsyncIterator[BodyReader]:
        m = self.store.messages.get(entry.queue_id)
        if m is None:
            raise SpoolIOError(f"cannot read message {entry.queue_id}: FileNotFoundError: no such message")
        yield BytesReader(m.body)

    def body(self, entry: QueueEntry) -> contextlib.AbstractAsyncContextManager[BodyReader]:
        return self._open_body(entry)

    async def pace_events(self, since: float) -> list[PaceEvent]:
        self._check_open()
        return [e for e in self.store.pacing if e.at >= since]

    # -- wake-ups --------------------------------------------------------------------------------
    async def wait_changed(self, max_wait: float) -> bool:
        assert self._changed is not None, "spool is not open"
        if not self._changed.is_set():
            with contextlib.suppress(TimeoutError):  # (asyncio.timeout, unlike 3.11's wait_for,
                async with asyncio.timeout(max_wait):  # never swallows a cancellation)
                    await self._changed.wait()
        changed = self._changed.is_set()
        self._changed.clear()
        self._flush_seen = self.store.flush_generation
        return changed

    def flush_generation(self) -> int:
        return self._flush_seen

    async def request_flush(self) -> None:
        self._check_open()
        self.store.flush_generation += 1
        self._flush_seen = self.store.flush_generation
        self.store.notify()

    # -- administration --------------------------------------------------------------------------
    async def get(self, queue_id: str) -> QueueEntry:
        return self._get(queue_id).entry

    def _matches(self, e: QueueEntry, f: QueueFilter, now: float) -> bool:
        if f.device and e.envelope.device != f.device:
            return False
        if f.sender and f.sender.strip() and not _address_matches(e.envelope.mail_from, f.sender):
            return False
        if f.min_age is not None and e.received_at > now - f.min_age:
            return False
        if f.state is QueueState.HELD and not e.held:
            return False
        state = None if f.state is QueueState.HELD else f.state
        recipient = f.recipient if f.recipient and f.recipient.strip() else None
        if state is not None or recipient is not None or f.transport:
            return any(
                (
                    state is None
                    or (state is QueueState.OPEN and r.state in _OPEN)
                    or r.state.value == state.value
                )
                and (recipient is None or _address_matches(r.rcpt, recipient))
                and (not f.transport or r.transport == f.transport)
                for r in e.recipients
            )
        return True

    async def query(
        self,
        where: QueueFilter,
        *,
        limit: int | None,
        order: QueueOrder = "oldest",
        cursor: str | None = None,
    ) -> QueuePage:
        self._check_open()
        now = self._clock()
        newest = order == "newest"
        found = [
            m.entry
            for _, m in sorted(self.store.messages.items(), reverse=newest)
            if self._matches(m.entry, where, now)
        ]
        after = found
        if cursor:
            after = [e for e in found if (e.queue_id < cursor if newest else e.queue_id > cursor)]
        page = after if limit is None else after[:limit]
        more = limit is not None and len(after) > limit
        return QueuePage(page, len(found), page[-1].queue_id if more and page else None)

    async def list(self) -> list[QueueEntry]:
        return (await self.query(QueueFilter(), limit=None)).entries

    async def stats(self) -> QueueStats:
        self._check_open()
        counts = {state.value: 0 for state in RcptState}
        held, oldest = 0, None
        for m in self.store.messages.values():
            held += m.entry.held
            for r in m.entry.recipients:
                counts[r.state.value] += 1
            if any(r.state in _OPEN for r in m.entry.recipients):
                oldest = m.entry.received_at if oldest is None else min(oldest, m.entry.received_at)
        return QueueStats(counts, held, oldest)

    async def hold(self, queue_id: str, held: bool) -> None:
        m = self._get(queue_id)
        m.entry = replace(m.entry, held=held)
        if not held:
            self.store.notify()

    def _make_due(self, m: _Message, now: float) -> None:
        rcpts = tuple(replace(r, next_attempt=now) if r.state in _OPEN else r for r in m.entry.recipients)
        m.entry = replace(m.entry, recipients=rcpts)

    async def retry(self, queue_id: str, now: float) -> None:
        self._make_due(self._get(queue_id), now)
        await self.request_flush()

    async def retry_matching(self, where: QueueFilter, now: float) -> int:
        self._check_open()
        matched = [m for m in self.store.messages.values() if self._matches(m.entry, where, self._clock())]
        for m in matched:
            self._make_due(m, now)
        await self.request_flush()
        return len(matched)

    async def delete(self, queue_id: str) -> None:
        self._get(queue_id)
        del self.store.messages[queue_id]


def _address_matches(address: str, pattern: str) -> bool:
    """``queue list --sender/--recipient``: an address, ``@domain``, ``*`` pattern or ``<>`` (the
    null sender), ignoring case (filters.py does the same in SQL)."""
    p = pattern.strip().lower()
    if p == "<>":
        return address == ""
    if p.startswith("@"):
        p = "*" + p
    p = p.replace("[", "[[]").replace("?", "[?]")  # only * is a wildcard, as in filters.py
    return fnmatchcase(address.lower(), p)
