"""Microsoft 365's side of a message: Exchange Online's message trace, read through Graph.

::

    model.py        TraceRecord / TraceDetail / TraceStatus (Graph's resources), TraceRequest, TraceResult
    plan.py         which queries answer a batch in the fewest requests (pure)
    budget.py       the client-side token bucket (a share of 100 requests per 5 minutes per tenant)
    graph_trace.py  MessageTraceClient: lookup(), traces(), details(); 403 -> TracePermissionError

Core: imports settings, errors and httpx only (never the sandbox or the diagnostics).
"""

from relay365.tracing.budget import TokenBucket
from relay365.tracing.graph_trace import MessageTraceClient, TokenProvider, needs_details
from relay365.tracing.model import TraceDetail, TraceRecord, TraceRequest, TraceResult, TraceStatus
from relay365.tracing.plan import TraceQuery, plan

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
