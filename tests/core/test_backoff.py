"""Retry timing on its own (delivery/backoff.py): doubling from the minimum to the maximum, a longer
Retry-After honoured, the queue lifetime. Pure functions of the numbers they are given."""

from __future__ import annotations

from relay365.delivery import backoff


def test_delay_doubles_from_the_minimum_up_to_the_maximum() -> None:
    delays = [backoff.backoff(n, minimum=300, maximum=4000) for n in range(0, 7)]
    assert delays == [300, 300, 600, 1200, 2400, 4000, 4000]  # Postfix's 300 s .. 4000 s
    # a huge attempt count does not overflow (the exponent is capped)
    assert backoff.backoff(10_000, minimum=300, maximum=4000) == 4000


def test_next_attempt_takes_the_longer_of_backoff_and_retry_after() -> None:
    assert backoff.next_attempt(1000.0, 1, minimum=60, maximum=600) == 1060
    assert backoff.next_attempt(1000.0, 2, minimum=60, maximum=600, retry_after=30) == 1120
    assert backoff.next_attempt(1000.0, 2, minimum=60, maximum=600, retry_after=3600) == 4600


def test_expired_at_the_lifetime() -> None:
    assert not backoff.expired(1000.0, 1000.0 + 86399, lifetime=86400)
    assert backoff.expired(1000.0, 1000.0 + 86400, lifetime=86400)
