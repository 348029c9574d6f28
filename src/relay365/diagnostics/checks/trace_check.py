"""Whether relay365 can follow mail into Microsoft 365: the message trace permission, probed once.

For each app registration the follower would use (``relay365.tracing.apps``: one per tenant), one
request to Graph's message trace (``GET /admin/exchange/tracing/messageTraces`` for a Message-ID that
cannot exist; https://learn.microsoft.com/graph/api/messagetracingroot-list-messagetraces): ``200``
passes, ``403`` means the application permission ``ExchangeMessageTrace.Read.All`` (with admin consent)
is missing. Both are warnings at worst: without the permission mail is delivered as before, only
what happens after Microsoft's ``250`` stays unknown. One request of the tenant's 100 per 5 minutes.
"""

from __future__ import annotations

from relay365.diagnostics.checks.result import CheckResult, passed, warned
from relay365.errors import Relay365Error, TracePermissionError
from relay365.oauth import GRAPH_SCOPE, token_source
from relay365.settings import Settings
from relay365.tracing.apps import TraceApp, follow_plan
from relay365.tracing.graph_trace import MessageTraceClient

PERMISSION = "ExchangeMessageTrace.Read.All"
GRANT = (
    f"In Microsoft Entra: App registrations > the app > API permissions > Add a permission > Microsoft "
    f"Graph > Application permissions > {PERMISSION}, then 'Grant admin consent'. Until then mail is "
    "delivered as before, but relay365 cannot tell what happened after Microsoft's 250"
)


async def _probe(app: TraceApp, followed: list[str], *, timeout_s: float) -> CheckResult:
    name = f"[{app.name}] message trace ({PERMISSION})"
    try:
        tokens = token_source(app.settings, scope=GRAPH_SCOPE)
    except Relay365Error as exc:
        return warned(name, f"no Graph token: {exc}", "See the token row of this transport")
    client = MessageTraceClient.for_transport(app.settings, tokens=tokens, max_wait=timeout_s)
    try:
        await client.probe()
    except TracePermissionError as exc:
        return warned(name, str(exc), GRANT)
    except Relay365Error as exc:
        return warned(name, f"the message trace did not answer: {exc}", "Check the Graph rows; try again")
    finally:
        await client.aclose()
        tokens.close()
    return passed(
        name,
        f"the app may read the trace: relay365 follows mail of {', '.join(followed)} into the "
        "mailboxes (Junk Email, quarantine, failures after 250)",
    )


async def check_message_trace(settings: Settings, *, timeout_s: float) -> list[CheckResult]:
    """One row per trace app (the probe) and one per Microsoft 365 transport that is not followed
    (information, not a warning: following is optional)."""
    if not settings.tracing.enabled:
        return []
    plan = follow_plan(settings)
    results = [
        passed(f"[{name}] message trace", f"not followed into Microsoft 365 (optional): {why}")
        for name, why in plan.skipped.items()
    ]
    for app in plan.apps.values():
        followed = sorted(t for t, a in plan.transports.items() if a == app.name)
        results.append(await _probe(app, followed, timeout_s=timeout_s))
    return results
