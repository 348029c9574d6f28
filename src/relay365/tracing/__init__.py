"""Microsoft 365's side of a message: Exchange Online's message trace, read through Graph.

::

    model.py        TraceRecord / TraceDetail / TraceStatus (Graph's resources), TraceRequest, TraceResult
    plan.py         which queries answer a batch in the fewest requests (pure)
    budget.py       the client-side token bucket (a share of 100 requests per 5 minutes per tenant)
    graph_trace.py  MessageTraceClient: lookup(), traces(), details(), probe(); 403 -> TracePermissionError

    The follower (after Microsoft's 250, what became of each recipient; [tracing]):
    follower.py     TraceFollower and start_follower(), the composition root's one call
    apps.py         which transports are followed, with which app registration (one per tenant)
    intake.py       delivered events of the tracking log -> rows to follow
    work.py         FollowItem, the FollowStore contract, MemoryFollowStore; work_sqlite.py: in tracking.db;
                    work_pg.py: in the PostgreSQL spool's database (service/sharing.py picks one)
    lookup.py       one pass of questions to one tenant's trace, within the request budget
    decide.py       what one answer changes for one row, and the events it records (pure)
    explain.py      reasons, relay365's advice (advice.toml), one timeline of both halves

Core: imports settings, errors, oauth, observability, replies and httpx (never the sandbox or the
diagnostics).
"""

from typing import TYPE_CHECKING, Any

from relay365.tracing.budget import TokenBucket
from relay365.tracing.model import TraceDetail, TraceRecord, TraceRequest, TraceResult, TraceStatus
from relay365.tracing.plan import TraceQuery, plan

if TYPE_CHECKING:
    from relay365.tracing.graph_trace import MessageTraceClient, TokenProvider, needs_details

_CLIENT = frozenset({"MessageTraceClient", "TokenProvider", "needs_details"})


def __getattr__(name: str) -> Any:
    """The Graph client (and httpx) is imported on first use: the console and the follower's store
    import this package in every relay, which follows nothing unless [tracing] says so (issue 11)."""
    if name in _CLIENT:
        from relay365.tracing import graph_trace

        return getattr(graph_trace, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MessageTraceClient",
    "TokenBucket",
    "TokenProvider",
    "TraceDetail",
    "TraceQuery",
    "TraceRecord",
    "TraceRequest",
    "TraceResult",
    "TraceStatus",
    "needs_details",
    "plan",
]
