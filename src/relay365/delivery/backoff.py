"""Retry timing as pure functions (Postfix: minimal_backoff_time 300 s, maximal_backoff_time 4000 s,
maximal_queue_lifetime 5 d). The delay doubles with each attempt, bounded by a minimum and a maximum;
an upstream's ``Retry-After`` is honoured when it asks for longer.
"""

from __future__ import annotations

MAX_EXPONENT = 16


def backoff(attempts: int, *, minimum: float, maximum: float) -> float:
    """Delay before the next try after ``attempts`` failed tries (1 -> minimum, 2 -> 2 x minimum ...)."""
    exponent = min(max(attempts - 1, 0), MAX_EXPONENT)
    return float(min(maximum, minimum * 2**exponent))


def next_attempt(
    now: float, attempts: int, *, minimum: float, maximum: float, retry_after: float | None = None
) -> float:
    delay = backoff(attempts, minimum=minimum, maximum=maximum)
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return now + delay


def expired(received_at: float, now: float, *, lifetime: float) -> bool:
    return now - received_at >= lifetime
