"""Delivery decisions as pure functions: what one attempt of one message does, and what its outcome
means. The scheduler (scheduler.py) does the I/O around them: claims, pacing reservations, the
transport call, tracking, recording; everything it decides goes through here, so these decisions are
tested on their own with a fake clock (tests/core/test_delivery_plan.py).

Plan an attempt: ``due_recipients`` (which recipients are due now), ``route`` (which transport takes
which recipient, in groups per route; unroutable ones bounce with ``NO_ROUTE_REPLY``), ``postponed``
(recipients left as they are until a hold-back or a pacing window ends: not an attempt).
Settle it: ``results_for_error`` and ``complete`` (a transport's answer as one result per recipient),
``split_fallback`` (route-level refusals move on to the route's fallback), ``settle`` (a result ->
the recipient's update: delivered, deferred with back-off, or bounced), ``throttle_pause`` (how long a
throttling reply pauses the mailbox), ``bounce_to`` (who gets the DSN, if anyone).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from relay365.delivery import backoff
from relay365.delivery.dsn import Failure, status_of
from relay365.delivery.pacing import is_throttle_reply
from relay365.delivery.router import NoRoute, RouteChoice, Router
from relay365.errors import PermanentDeliveryError, Relay365Error, TransientDeliveryError
from relay365.settings import DeliverySettings
from relay365.spool.model import QueueEntry, RcptState, Recipient, RecipientUpdate
from relay365.transports.base import Outcome, RecipientResult

# RFC 3463 X.4.4: unable to route (no route rule of this relay takes the recipient)
NO_ROUTE_REPLY = "554 5.4.4 No route configured for this recipient"
NO_RESULT_REPLY = "451 4.3.0 no result from transport"
OPEN = (RcptState.QUEUED, RcptState.DEFERRED)


def internal_reply(error: BaseException) -> str:
    """The recorded reply for an exception that is not a ``DeliveryError`` (RFC 3463 X.3.0: other
    or undefined mail system status), one line, readable in ``relay365 queue show``."""
    text = " ".join(str(error).split())[:500]
    if isinstance(error, Relay365Error):  # the relay's own, already worded for the admin
        return f"451 4.3.0 {text}"
    return f"451 4.3.0 internal error: {type(error).__name__}: {text}"


def route_level(reply: str) -> bool:
    """A failure of the way (auth, permission, attribution, connection, throttling) rather than of
    the recipient (RFC 3463 x.1.x addressing, Exchange's 5.4.1 "recipient address rejected"): only
    those move on to a route's fallback transport."""
    status = status_of(reply)
    return not (status[2:].startswith("1.") or status.endswith(".4.1"))


def due_recipients(entry: QueueEntry, now: float) -> list[Recipient]:
    """The recipients of ``entry`` this attempt is for: still open and due at ``now``."""
    return [r for r in entry.recipients if r.state in OPEN and r.next_attempt <= now]


@dataclass(frozen=True, slots=True)
class Group:
    """Recipients that go to one transport together, and the transports to fall back to in order."""

    transport: str
    fallbacks: tuple[str, ...]
    rcpts: tuple[str, ...]


@dataclass
class RoutePlan:
    """Where each due recipient goes: ``groups`` in the order their first recipient came,
    ``choices`` for each routed recipient (for tracking), ``unroutable`` with the reason."""

    groups: list[Group] = field(default_factory=list)
    choices: list[tuple[str, RouteChoice]] = field(default_factory=list)
    unroutable: list[tuple[str, str]] = field(default_factory=list)

    def no_route(self) -> tuple[list[RecipientUpdate], list[Failure]]:
        """Unroutable recipients bounce at once: retrying cannot find a route the config lacks."""
        failures = [Failure(rcpt, f"{NO_ROUTE_REPLY} ({why})") for rcpt, why in self.unroutable]
        return [RecipientUpdate(f.rcpt, RcptState.BOUNCED, f.reply) for f in failures], failures


def route(router: Router, entry: QueueEntry, due: Iterable[Recipient]) -> RoutePlan:
    """Split the due recipients per route (the router's first matching rule for each)."""
    plan = RoutePlan()
    grouped: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for r in due:
        try:
            choice = router.choose(
                rcpt=r.rcpt, sender=entry.envelope.mail_from, device=entry.envelope.device, size=entry.size
            )
        except NoRoute as e:
            plan.unroutable.append((r.rcpt, str(e)))
            continue
        grouped.setdefault((choice.transport, choice.fallbacks), []).append(r.rcpt)
        plan.choices.append((r.rcpt, choice))
    plan.groups = [Group(name, fallbacks, tuple(rcpts)) for (name, fallbacks), rcpts in grouped.items()]
    return plan


def postponed(
    entry: QueueEntry, rcpts: Iterable[str], until: float, *, reply: str = ""
) -> list[RecipientUpdate]:
    """Recipients left in their state until ``until`` without counting an attempt (a hold-back, a
    pacing limit, a transport removed by a reload). ``reply`` is shown only where none was recorded."""
    states = {r.rcpt: r for r in entry.recipients}
    return [
        RecipientUpdate(r, states[r].state, states[r].last_reply or reply, until, counts_attempt=False)
        for r in rcpts
    ]


def results_for_error(
    rcpts: Iterable[str], error: TransientDeliveryError | PermanentDeliveryError
) -> list[RecipientResult]:
    """A transport's ``DeliveryError`` for the whole message: the same result for each recipient."""
    if isinstance(error, PermanentDeliveryError):
        return [RecipientResult(r, Outcome.PERMANENT, error.reply) for r in rcpts]
    return [RecipientResult(r, Outcome.TRANSIENT, error.reply, error.retry_after) for r in rcpts]


def results_for_bug(rcpts: Iterable[str], error: BaseException) -> list[RecipientResult]:
    """Anything else a transport raised (a bug): a 4xx for each recipient, visibly worded."""
    return [RecipientResult(r, Outcome.TRANSIENT, internal_reply(error)) for r in rcpts]


def complete(rcpts: Sequence[str], results: Sequence[RecipientResult]) -> list[RecipientResult]:
    """The transport's results, plus a 4xx for every recipient it gave no result for."""
    missing = set(rcpts) - {r.rcpt for r in results}
    return [*results, *(RecipientResult(r, Outcome.TRANSIENT, NO_RESULT_REPLY) for r in sorted(missing))]


def split_fallback(
    results: Iterable[RecipientResult], fallbacks: tuple[str, ...]
) -> tuple[list[str], list[RecipientResult]]:
    """(recipients to try again on ``fallbacks[0]``, results that settle): a route-level failure moves
    on while the route has a fallback left; deliveries and recipient-level failures settle."""
    retry: list[str] = []
    final: list[RecipientResult] = []
    for res in results:
        if res.outcome is not Outcome.DELIVERED and fallbacks and route_level(res.reply):
            retry.append(res.rcpt)
        else:
            final.append(res)
    return retry, final


def settle(
    res: RecipientResult, *, attempts: int, received_at: float, now: float, settings: DeliverySettings
) -> tuple[RecipientUpdate, Failure | None]:
    """One recipient's result -> its update, and the failure to report in a DSN if it bounces.
    ``attempts``: tries recorded before this one. A transient failure is deferred with back-off
    (backoff.py) until the queue lifetime ends; then it bounces as expired (RFC 3463 4.4.7)."""
    if res.outcome is Outcome.DELIVERED:
        return RecipientUpdate(res.rcpt, RcptState.DELIVERED, res.reply), None
    if res.outcome is Outcome.PERMANENT:
        return RecipientUpdate(res.rcpt, RcptState.BOUNCED, res.reply), Failure(res.rcpt, res.reply)
    if backoff.expired(received_at, now, lifetime=settings.queue_lifetime):
        failure = Failure(res.rcpt, res.reply, expired=True)
        return RecipientUpdate(res.rcpt, RcptState.BOUNCED, res.reply), failure
    when = backoff.next_attempt(
        now,
        attempts + 1,
        minimum=settings.min_backoff,
        maximum=settings.max_backoff,
        retry_after=res.retry_after,
    )
    return RecipientUpdate(res.rcpt, RcptState.DEFERRED, res.reply, when), None


def throttle_pause(results: Iterable[RecipientResult], window: float) -> tuple[float, str] | None:
    """(seconds, reply) a throttling reply pauses the mailbox for: its Retry-After, else one pacing
    window; None without one."""
    for res in results:
        if is_throttle_reply(res.reply):
            return (res.retry_after or window), res.reply
    return None


def bounce_to(entry: QueueEntry, failures: Sequence[Failure]) -> str | None:
    """The sender to send a DSN to, or None: no failures, or mail from <> or a DSN itself (RFC 3461
    section 6.2 / RFC 5321 section 4.5.5: never bounce a bounce)."""
    if not failures or not entry.envelope.mail_from or entry.envelope.is_dsn:
        return None
    return entry.envelope.mail_from
