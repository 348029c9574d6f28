"""What relays that share one spool share besides the queue: pacing, hold-backs of dead upstreams, the
tracking log and the trace follower's work. The spool decides: on the PostgreSQL spool all four live
in its database (so Microsoft's per-mailbox limits hold for all nodes together, one node's discovery
of a dead upstream spares the others, the message trace shows every node's events, and each delivered
recipient is looked up in Microsoft's trace by one node only); on SQLite and memory pacing and holds
stay in the process (pacing history persisted with the outcomes), the tracking log and the follower's
work in ``tracking.db``.

The composition root asks here and only here (``Relay``: ``delivery_shares``, ``tracking_log``,
``follow_store``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypedDict

from relay365.delivery.holds import HoldBoard, NoBoard
from relay365.delivery.pacestore import LocalPaceStore, PaceStore
from relay365.observability.tracking import MemoryTrackingLog, TrackingLog
from relay365.observability.tracking_sqlite import SqliteTrackingLog
from relay365.settings import Settings
from relay365.spool.contract import Spool
from relay365.tracing.work import FollowStore, MemoryFollowStore
from relay365.tracing.work_sqlite import SqliteFollowStore

if TYPE_CHECKING:
    from relay365.spool.postgres import PgSpool


class DeliveryShares(TypedDict):
    """The ``Scheduler``'s keyword arguments for what it shares with other relays."""

    pace: PaceStore
    holds_board: HoldBoard


def _postgres(spool: Spool) -> PgSpool | None:
    """``spool`` if it is a PostgreSQL spool. (Its module, and psycopg, are imported only when such a
    spool was made: a relay or ingress worker on SQLite never loads them.)"""
    module = sys.modules.get("relay365.spool.postgres")
    return spool if module is not None and isinstance(spool, module.PgSpool) else None


def delivery_shares(spool: Spool, *, owner: str, clock: Callable[[], float] = time.time) -> DeliveryShares:
    if (pg := _postgres(spool)) is not None:
        from relay365.delivery.holds_pg import PgHoldBoard
        from relay365.delivery.pacestore_pg import PgPaceStore

        return {"pace": PgPaceStore(pg, owner=owner, clock=clock), "holds_board": PgHoldBoard(pg)}
    return {"pace": LocalPaceStore(clock=clock), "holds_board": NoBoard()}


def tracking_log(settings: Settings, spool: Spool, *, clock: Callable[[], float] = time.time) -> TrackingLog:
    """The tracking log (not yet opened): in the PostgreSQL spool's database, SQLite beside the queue,
    or memory when switched off."""
    t = settings.tracking
    if not t.enabled:
        return MemoryTrackingLog(clock=clock)
    if (pg := _postgres(spool)) is not None:
        from relay365.observability.tracking_pg import PgTrackingLog

        return PgTrackingLog(pg.target, retention_days=t.retention_days, clock=clock, log_events=t.log_events)
    return SqliteTrackingLog(
        t.path or settings.server.spool_dir / "tracking.db",
        retention_days=t.retention_days,
        clock=clock,
        log_events=t.log_events,
    )


def follow_store(settings: Settings, spool: Spool) -> FollowStore:
    """The trace follower's work (not yet opened), beside the tracking log: in the PostgreSQL spool's
    database, in ``tracking.db``, or in memory when the tracking log is switched off."""
    t = settings.tracking
    if not t.enabled:
        return MemoryFollowStore()
    if (pg := _postgres(spool)) is not None:
        from relay365.tracing.work_pg import PgFollowStore  # psycopg: only for a PostgreSQL spool

        return PgFollowStore(pg.target)
    return SqliteFollowStore(t.path or settings.server.spool_dir / "tracking.db")
