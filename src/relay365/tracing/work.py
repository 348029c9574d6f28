"""The follower's work: one row per recipient handed to Microsoft 365, until its trace is settled.

A :class:`FollowItem` is made when the tracking log shows a ``delivered`` event on a followed transport
(Microsoft said 250 or 202) and lives until Microsoft's trace gives the recipient a final status or
``[tracing] horizon`` passes; settled rows stay (``done``) for the overview's counts until purged.

The :class:`FollowStore` contract (SQLite in ``work_sqlite.py``, :class:`MemoryFollowStore` here; a
PostgreSQL one beside a PostgreSQL tracking log implements the same):

- ``add`` is idempotent: a row that exists (same queue id and recipient) is kept as it is, so the same
  ``delivered`` event read twice, by one process or by several, makes one row;
- ``claim`` gives due rows to one owner at a time, for ``lease`` seconds: several relays sharing the
  store never ask Microsoft about the same recipient at once, and the rows of a relay that died are
  claimed by another after the lease;
- ``settle`` writes rows back and ends their claim, but only rows the owner still holds; it returns
  those, and only for those does the follower write events (so no event is written twice);
- ``lead`` makes one owner at a time the one that asks Microsoft (the quota is the tenant's, not the
  relay's: two relays asking at once would each spend their own 80 of the same 100 requests); the
  others keep taking in and wait, and one of them leads when the leader's lease runs out;
- ``release`` gives back an owner's claims when it stops, so its rows do not wait for the lease;
- what ``add``, ``settle`` and ``set_cursor`` wrote survives a restart (SQLite: a transaction each).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True, kw_only=True)
class FollowItem:
    """One recipient of one queued message, as handed to Microsoft 365 by ``transport``."""

    queue_id: str
    recipient: str  # lower case
    message_id: str  # without angle brackets; "" when the message had none
    sender: str  # the envelope sender relay365 used
    subject: str
    device: str
    transport: str
    route: str
    sent_at: float  # when the transport got 250 / 202
    due: float  # when to ask Microsoft next
    status: str = ""  # the last trace status recorded (Graph's value, e.g. "filteredAsSpam"); "" none
    trace_id: str = ""  # Microsoft's message trace id, once found
    received_at: float = 0.0  # receivedDateTime, once found
    from_ip: str = ""  # fromIP, once found
    checks: int = 0  # how often Microsoft was asked
    done: bool = False
    details_due: bool = False  # a final status is known; its events are still to be read

    @property
    def key(self) -> tuple[str, str]:
        return self.queue_id, self.recipient

    def but(self, **changes: object) -> FollowItem:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class OutcomeCount:
    """How many recipients of ``route`` / ``transport`` Microsoft's trace gave ``status`` ("" for
    recipients whose trace is still awaited; "unresolved" past the horizon)."""

    route: str
    transport: str
    status: str
    count: int


class FollowStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def add(self, items: Sequence[FollowItem]) -> int:
        """Insert rows that do not exist yet; return how many were new."""
        ...

    async def claim(self, *, owner: str, now: float, lease: float, limit: int) -> list[FollowItem]:
        """Due rows (``due <= now``, not done) that no one else holds (its own, after a pass that
        failed, included), oldest due first, held by ``owner`` until ``now + lease``."""
        ...

    async def settle(self, items: Sequence[FollowItem], *, owner: str) -> list[FollowItem]:
        """Write these rows back and release them, where ``owner`` still holds them; return those."""
        ...

    async def release(self, *, owner: str) -> int:
        """End every claim ``owner`` holds (the rows keep their due time); return how many."""
        ...

    async def lead(self, *, owner: str, now: float, lease: float) -> bool:
        """Become (or stay) the one owner that asks Microsoft, until ``now + lease``; False while
        another owner's lead lasts."""
        ...

    async def cursor(self) -> float | None:
        """The time of the newest ``delivered`` event taken in (None before the first intake)."""
        ...

    async def set_cursor(self, at: float) -> None: ...

    async def for_message(self, queue_id: str) -> list[FollowItem]: ...

    async def outcomes(self, since: float) -> list[OutcomeCount]:
        """Counts per route, transport and status of rows handed over since ``since``."""
        ...

    async def next_due(self) -> float | None: ...

    async def purge(self, before: float) -> int:
        """Delete settled rows handed over before ``before``; return how many."""
        ...


class MemoryFollowStore:
    """The test double (and the store when the tracking log is in memory: nothing survives)."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], FollowItem] = {}
        self._claims: dict[tuple[str, str], tuple[str, float]] = {}
        self._cursor: float | None = None
        self._leader: tuple[str, float] = ("", 0.0)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def add(self, items: Sequence[FollowItem]) -> int:
        new = 0
        for item in items:
            if item.key not in self._rows:
                self._rows[item.key] = item
                new += 1
        return new

    def _free(self, key: tuple[str, str], owner: str, now: float) -> bool:
        holder = self._claims.get(key)
        return holder is None or holder[0] == owner or holder[1] < now

    async def claim(self, *, owner: str, now: float, lease: float, limit: int) -> list[FollowItem]:
        due = sorted(
            (r for r in self._rows.values() if not r.done and r.due <= now and self._free(r.key, owner, now)),
            key=lambda r: (r.due, r.key),
        )[:limit]
        for r in due:
            self._claims[r.key] = (owner, now + lease)
        return due

    async def settle(self, items: Sequence[FollowItem], *, owner: str) -> list[FollowItem]:
        written = []
        for item in items:
            holder = self._claims.get(item.key)
            if holder is None or holder[0] != owner or item.key not in self._rows:
                continue
            self._rows[item.key] = item
            del self._claims[item.key]
            written.append(item)
        return written

    async def release(self, *, owner: str) -> int:
        mine = [k for k, (o, _) in self._claims.items() if o == owner]
        for k in mine:
            del self._claims[k]
        if self._leader[0] == owner:
            self._leader = ("", 0.0)
        return len(mine)

    async def lead(self, *, owner: str, now: float, lease: float) -> bool:
        holder, until = self._leader
        if holder and holder != owner and until >= now:
            return False
        self._leader = (owner, now + lease)
        return True

    async def cursor(self) -> float | None:
        return self._cursor

    async def set_cursor(self, at: float) -> None:
        self._cursor = at

    async def for_message(self, queue_id: str) -> list[FollowItem]:
        return sorted((r for r in self._rows.values() if r.queue_id == queue_id), key=lambda r: r.recipient)

    async def outcomes(self, since: float) -> list[OutcomeCount]:
        counts: dict[tuple[str, str, str], int] = {}
        for r in self._rows.values():
            if r.sent_at >= since:
                key = (r.route, r.transport, r.status)
                counts[key] = counts.get(key, 0) + 1
        return [OutcomeCount(*k, n) for k, n in sorted(counts.items())]

    async def next_due(self) -> float | None:
        return min((r.due for r in self._rows.values() if not r.done), default=None)

    async def purge(self, before: float) -> int:
        gone = [k for k, r in self._rows.items() if r.done and r.sent_at < before]
        for k in gone:
            del self._rows[k]
        return len(gone)
