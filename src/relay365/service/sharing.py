"""What relays that share one spool share besides the queue: pacing, hold-backs of dead upstreams and
the tracking log. The spool decides: on the PostgreSQL spool all three live in its database (so
Microsoft's per-mailbox limits hold for all nodes together, one node's discovery of a dead upstream
spares the others, and the message trace shows every node's events); on SQLite and memory they stay
in the process (pacing history persisted with the outcomes) and the tracking log in ``tracking.db``.

The composition root asks here and only here (``Relay``: ``delivery_shares``, ``tracking_log``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypedDict

from relay365.delivery.holds import HoldBoard, NoBoard
from relay365.delivery.holds_pg import PgHoldBoard
from relay365.delivery.pacestore import LocalPaceStore, PaceStore
from relay365.delivery.pacestore_pg import PgPaceStore
from relay365.observability.tracking import MemoryTrackingLog, TrackingLog
from relay365.observability.tracking_pg import PgTrackingLog
from relay365.observability.tracking_sqlite import SqliteTrackingLog
from relay365.settings import Settings
from relay365.spool.contract import Spool
from relay365.spool.postgres import PgSpool


class DeliveryShares(TypedDict):
    """The ``Scheduler``'s keyword arguments for what it shares with other relays."""

    pace: PaceStore
    holds_board: HoldBoard


def delivery_shares(spool: Spool, *, owner: str, clock: Callable[[], float] = time.time) -> DeliveryShares:
    if isinstance(spool, PgSpool):
        return {"pace": PgPaceStore(spool, owner=owner, clock=clock), "holds_board": PgHoldBoard(spool)}
    return {"pace": LocalPaceStore(clock=clock), "holds_board": NoBoard()}


def tracking_log(settings: Settings, spool: Spool, *, clock: Callable[[], float] = time.time) -> TrackingLog:
    """The tracking log (not yet opened): in the PostgreSQL spool's database, SQLite beside the queue,
    or memory when switched off."""
    t = settings.tracking
    if not t.enabled:
        return MemoryTrackingLog(clock=clock)
    if isinstance(spool, PgSpool):
        return PgTrackingLog(
            spool.target, retention_days=t.retention_days, clock=clock, log_events=t.log_events
        )
    return SqliteTrackingLog(
        t.path or settings.server.spool_dir / "tracking.db",
        retention_days=t.retention_days,
        clock=clock,
        log_events=t.log_events,
    )
