"""The PostgreSQL spool: one queue shared by several relays (``[spool] url = "postgresql://..."``).

Everything lives in the database, bodies included (pg_bodies.py), so any node can deliver any message.
The contract is spool/contract.py; what PostgreSQL adds:

- **Durable on return.** Every connection runs with ``synchronous_commit = on`` (set on the session,
  whatever the server's default), so a COMMIT returns once the WAL is flushed; ingress answers ``250``
  only after the commit of the queue entry (RFC 5321 section 6.1). With synchronous replication
  configured by the operator, that also means "on the standby".
- **Claims** (pg_rows.claim): ``UPDATE ... WHERE queue_id IN (SELECT ... FOR UPDATE SKIP LOCKED)``
  in one statement: nodes claiming at once take different messages and never wait for each other.
  ``record`` locks the row and checks the owner in the transaction that writes the outcome.
- **Owners** are alive while they hold their advisory lock (pg_control.py); ``recover`` releases the
  claims and removes the half-received bodies of owners that provably died, and every owner repeats
  that sweep every ``SWEEP_EVERY`` seconds, so the messages of a node whose process died move to the
  others within seconds. A node that dies without a trace (its host gone) loses its lock once TCP
  keepalives give up (~25 s) and its claims when their leases end (``[delivery] lease``).
- **Wake-ups** by LISTEN/NOTIFY (pg_control.py): another node hears new mail, a release, a retry or a
  flush as the transaction commits.
- **Outages.** A statement that fails because the database is unreachable raises ``SpoolIOError``:
  ingress answers ``451 4.3.0`` (nothing was acknowledged that was not committed), delivery stops and
  probes (delivery/recorder.py). The pool replaces broken connections by itself; nothing needs a
  restart when the database is back.
- **Schema.** ``open`` refuses a database whose schema is missing, older or newer than this build
  (``SpoolSchemaError``: run ``relay365 spool migrate``), see pg_schema.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg_pool

from relay365.errors import LeaseLost, QueueEntryNotFound, SpoolError
from relay365.spool import pg_rows as rows
from relay365.spool import pg_schema as schema
from relay365.spool.contract import Recovery
from relay365.spool.model import (
    BodyReader,
    Bounce,
    Envelope,
    PaceEvent,
    QueueEntry,
    QueueFilter,
    QueueOrder,
    QueuePage,
    QueueStats,
    RecipientUpdate,
    new_owner_id,
    new_queue_id,
)
from relay365.spool.pg_bodies import PgIncoming, insert_chunks_tx, open_body, split
from relay365.spool.pg_connect import PgTarget, make_pool, mapped
from relay365.spool.pg_control import LOCK_CLASS, Control
from relay365.spool.wire import stuff

log = logging.getLogger(__name__)
T = TypeVar("T")
SWEEP_EVERY = 5.0  # seconds between an owner's sweeps for dead owners (``recover`` without attaching)
Conn = psycopg.AsyncConnection[Any]


class PgSpool:
    def __init__(self, target: PgTarget, *, clock: Callable[[], float] = time.time) -> None:
        self.target = target
        self._clock = clock
        self._pool: psycopg_pool.AsyncConnectionPool | None = None
        self._token = secrets.token_hex(4)  # this handle, in the NOTIFY payloads it sends
        self._control: Control | None = None
        self._changed: asyncio.Event | None = None
        self._flush_generation = 0
        self._owner_lock = asyncio.Lock()
        self._sweeper: asyncio.Task[None] | None = None
        self.server_version = 0

    # -- plumbing ----------------------------------------------------------------------------------
    @property
    def pool(self) -> psycopg_pool.AsyncConnectionPool:
        if self._pool is None:
            raise SpoolError("the PostgreSQL spool is not open")
        return self._pool

    def now(self) -> float:
        return self._clock()

    async def statement(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """``fn`` on a pooled connection in autocommit (each statement its own transaction)."""
        with mapped():
            async with self.pool.connection() as conn:
                return await fn(conn)

    async def transaction(self, fn: Callable[[Conn], Awaitable[T]], *, isolation: str = "") -> T:
        """``fn`` inside one transaction, committed (durably) when it returns, else rolled back."""
        with mapped():
            async with self.pool.connection() as conn, conn.transaction():
                if isolation:
                    await conn.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}".encode())
                return await fn(conn)

    def payload(self, kind: str, generation: int = 0) -> str:
        return f"{kind}:{self._token}:{generation}"

    def changed(self, kind: str = "", generation: int = 0) -> None:
        """A change this process made or heard of: wake the waiter."""
        self._flush_generation = max(self._flush_generation, generation)
        if self._changed is not None:
            self._changed.set()

    def _reconnected(self) -> None:
        self.changed()
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(self._refresh_generation())

    async def _refresh_generation(self) -> None:
        with contextlib.suppress(SpoolError):
            self.changed(generation=await self.statement(rows.flush_generation))

    # -- lifecycle ---------------------------------------------------------------------------------
    async def open(self) -> None:
        self._changed = asyncio.Event()
        self._pool = make_pool(self.target, name=f"relay365-spool-{self._token}")
        try:
            with mapped():
                await self._pool.open(wait=True, timeout=max(5.0, self.target.connect_timeout * 2))
            await self.statement(self._check)
            self._control = Control(
                self.target, token=self._token, on_change=self.changed, on_reconnect=self._reconnected
            )
            with mapped():
                await self._control.start()
            self._flush_generation = await self.statement(rows.flush_generation)
        except BaseException:
            await self.close()
            raise

    async def _check(self, conn: Conn) -> None:
        self.server_version = conn.info.server_version
        schema.check_server(self.server_version)
        schema.check_version(await schema.aschema_version(conn), self.target.shown())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        if self._control is not None:
            await self._control.close()
            self._control = None
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await self._pool.close()
            self._pool = None

    # -- owners ------------------------------------------------------------------------------------
    @property
    def owner(self) -> str | None:
        return self._control.owner if self._control is not None else None

    async def ensure_owner(self, owner: str | None = None) -> str:
        """Work as ``owner`` (a new one if None) unless already attached: register it, take its lock."""
        if self._control is None:
            raise SpoolError("the PostgreSQL spool is not open")
        async with self._owner_lock:
            have = self._control.owner
            if have is not None:
                if owner is not None and owner != have:
                    raise ValueError(f"this spool handle works as {have}, not {owner}")
                return have
            mine = owner or new_owner_id()
            with mapped():
                await self._control.hold_owner(mine)
            self._sweeper = asyncio.create_task(self._sweep(mine), name="spool-sweep")
            return mine

    async def _sweep(self, me: str) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            try:
                await self._clean(me)
            except SpoolError as e:
                log.debug("spool sweep for dead owners failed: %s", e)

    async def recover(self, owner: str) -> Recovery:
        return await self._clean(await self.ensure_owner(owner))

    async def _clean(self, me: str) -> Recovery:
        async def clean(conn: Conn) -> Recovery:
            cur = await conn.execute(
                "SELECT o.owner, o.lock_id FROM relay365.owners o WHERE o.owner <> %s ORDER BY o.owner", (me,)
            )
            dead: list[str] = []
            for name, lock_id in await cur.fetchall():
                got = await conn.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", (LOCK_CLASS, lock_id))
                row = await got.fetchone()
                if row is not None and row[0]:
                    dead.append(name)
            # Claims and half-received bodies of owners without a row died long ago (an earlier
            # recovery removed the row while a statement of theirs was still on its way).
            cur = await conn.execute(
                "SELECT DISTINCT lease_owner FROM relay365.messages WHERE lease_owner <> ''"
                " AND lease_owner NOT IN (SELECT owner FROM relay365.owners)"
                " UNION SELECT DISTINCT owner FROM relay365.incoming"
                " WHERE owner NOT IN (SELECT owner FROM relay365.owners)"
            )
            orphans = [r[0] for r in await cur.fetchall() if r[0] != me]
            gone = dead + orphans
            if not gone:
                return Recovery()
            cur = await conn.execute(
                "DELETE FROM relay365.incoming WHERE owner = ANY(%s) RETURNING queue_id", (gone,)
            )
            partial = [r[0] for r in await cur.fetchall()]
            if partial:
                await conn.execute("DELETE FROM relay365.bodies WHERE queue_id = ANY(%s)", (partial,))
            cur = await conn.execute(
                "UPDATE relay365.messages SET lease_owner = '', lease_until = 0 WHERE lease_owner = ANY(%s)",
                (gone,),
            )
            released = cur.rowcount
            await conn.execute("DELETE FROM relay365.pace_sessions WHERE owner = ANY(%s)", (gone,))
            await conn.execute("DELETE FROM relay365.owners WHERE owner = ANY(%s)", (dead,))
            if released:
                await rows.notify(conn, self.payload("release"))
            return Recovery(tuple(sorted(set(gone))), len(partial), released)

        found = await self.transaction(clean)
        if found.bodies_removed or found.claims_released:
            log.warning(
                "spool recovery: removed %d incomplete message(s), released %d claim(s) of %d dead owner(s)",
                found.bodies_removed,
                found.claims_released,
                len(found.dead_owners),
            )
        if found.claims_released:
            self.changed()
        return found

    # -- receiving ---------------------------------------------------------------------------------
    def check_room(self, size: int = 0) -> None:
        """PostgreSQL reports a full disk itself (SQLSTATE 53100: ``SpoolFullError``, 452 4.3.1);
        there is no free-space reserve to check on the relay's side."""
        if self._pool is None:
            raise SpoolError("the PostgreSQL spool is not open")

    def incoming(self) -> PgIncoming:
        self.check_room()
        return PgIncoming(self)

    async def enqueue(self, envelope: Envelope, body: bytes) -> str:
        msg = self.incoming()
        msg.write(stuff(body))
        return await msg.commit(envelope)

    # -- delivery ----------------------------------------------------------------------------------
    async def claim(self, *, owner: str, now: float, limit: int, lease: float) -> list[QueueEntry]:
        await self.ensure_owner(owner)
        if limit <= 0:
            return []
        return await self.statement(
            lambda conn: rows.claim(conn, owner=owner, now=now, limit=limit, lease=lease)
        )

    async def renew(self, queue_ids: Sequence[str], *, owner: str, until: float) -> set[str]:
        ids = list(queue_ids)
        if not ids:
            return set()
        return await self.statement(lambda conn: rows.renew(conn, ids, owner=owner, until=until))

    async def release(self, queue_id: str, *, owner: str) -> None:
        async def give_back(conn: Conn) -> bool:
            if await rows.release(conn, queue_id, owner=owner):
                await rows.notify(conn, self.payload("release"))
                return True
            return False

        if await self.transaction(give_back):
            self.changed()

    async def next_due_time(self) -> float | None:
        return await self.statement(rows.next_due_time)

    async def record(
        self,
        queue_id: str,
        updates: Sequence[RecipientUpdate],
        *,
        owner: str,
        bounce: Bounce | None = None,
        pace_events: Sequence[PaceEvent] = (),
    ) -> None:
        now = self._clock()

        async def write(conn: Conn) -> None:
            await rows.check_claim_tx(conn, queue_id, owner)
            if bounce is not None:
                dsn_id = new_queue_id()
                await insert_chunks_tx(conn, dsn_id, split(bounce.body))
                params = rows.insert_params(dsn_id, bounce.envelope, len(bounce.body), now)
                params["payload"] = self.payload("new")
                await conn.execute(rows.insert_sql(with_body=False, notify="new").encode(), params)
            await rows.apply_outcome_tx(conn, queue_id, updates, pace_events, now)

        await self.transaction(write)
        if bounce is not None:
            self.changed()

    def body(self, entry: QueueEntry) -> contextlib.AbstractAsyncContextManager[BodyReader]:
        return open_body(entry.queue_id, self.statement)

    async def pace_events(self, since: float) -> list[PaceEvent]:
        return await self.statement(lambda conn: rows.pace_events(conn, since))

    # -- wake-ups ----------------------------------------------------------------------------------
    async def wait_changed(self, max_wait: float) -> bool:
        assert self._changed is not None, "spool is not open"
        if not self._changed.is_set():
            with contextlib.suppress(TimeoutError):  # (asyncio.timeout keeps cancellations)
                async with asyncio.timeout(max_wait):
                    await self._changed.wait()
        changed = self._changed.is_set()
        self._changed.clear()
        return changed

    def flush_generation(self) -> int:
        return self._flush_generation

    async def request_flush(self) -> None:
        await self._bump(None)

    async def _bump(self, change: Callable[[Conn], Awaitable[T]] | None) -> T | None:
        """``change`` and one more flush request in one transaction; everyone is woken."""

        async def write(conn: Conn) -> tuple[T | None, int]:
            result = await change(conn) if change is not None else None
            generation = await rows.bump_flush_tx(conn)
            await conn.execute("DELETE FROM relay365.upstream_holds")  # flush revives them everywhere
            await rows.notify(conn, self.payload("flush", generation))
            return result, generation

        result, generation = await self.transaction(write)
        self.changed("flush", generation)
        return result

    # -- administration ----------------------------------------------------------------------------
    async def get(self, queue_id: str) -> QueueEntry:
        return await self.statement(lambda conn: rows.read_entry(conn, queue_id))

    async def stats(self) -> QueueStats:
        return await self.transaction(rows.stats, isolation="REPEATABLE READ")

    async def query(
        self,
        where: QueueFilter,
        *,
        limit: int | None,
        order: QueueOrder = "oldest",
        cursor: str | None = None,
    ) -> QueuePage:
        now = self._clock()

        async def read(conn: Conn) -> QueuePage:
            total, entries, more = await rows.select_page(
                conn, where, limit=limit, order=order, cursor=cursor, now=now
            )
            return QueuePage(entries, total, entries[-1].queue_id if more and entries else None)

        return await self.transaction(read, isolation="REPEATABLE READ READ ONLY")

    async def list(self) -> list[QueueEntry]:
        return (await self.query(QueueFilter(), limit=None)).entries

    async def retry_matching(self, where: QueueFilter, now: float) -> int:
        count = await self._bump(lambda conn: rows.make_due_tx(conn, where, None, now))
        return int(count or 0)

    async def retry(self, queue_id: str, now: float) -> None:
        await self._bump(lambda conn: rows.make_due_tx(conn, None, queue_id, now))

    async def hold(self, queue_id: str, held: bool) -> None:
        async def write(conn: Conn) -> None:
            await rows.set_held(conn, queue_id, held)
            if not held:
                await rows.notify(conn, self.payload("hold"))

        await self.transaction(write)
        if not held:
            self.changed()

    async def delete(self, queue_id: str) -> None:
        await self.transaction(lambda conn: rows.delete_tx(conn, queue_id))


__all__ = ["LeaseLost", "PgSpool", "PgTarget", "QueueEntryNotFound"]
