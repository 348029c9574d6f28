"""The pacer: windows per upstream mailbox, as pure timing decisions on a controlled clock."""

from __future__ import annotations

from relay365.delivery.pacing import Pacer, is_throttle_reply
from relay365.spool.model import PaceEvent
from relay365.transports.base import PaceLimits


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_messages_per_window() -> None:
    clock = Clock()
    pacer = Pacer(clock=clock)
    limits = PaceLimits(messages_per_window=30, window=60)
    for _ in range(30):
        assert pacer.wait_time("m", limits, 1) == 0
        pacer.end(pacer.begin("m", 1), delivered=1)
        clock.now += 1
    # 30 sent at t=0..29; the 31st may go when the first leaves the window (t=60).
    assert pacer.wait_time("m", limits, 1) == 60 - 30
    clock.now += 30
    assert pacer.wait_time("m", limits, 1) == 0
    assert pacer.wait_time("other", limits, 1) == 0  # per mailbox


def test_recipients_per_rolling_day() -> None:
    clock = Clock()
    pacer = Pacer(clock=clock)
    limits = PaceLimits(messages_per_window=10**6, recipients_per_day=1000, day=86_400)
    pacer.end(pacer.begin("m", 600), delivered=600)
    clock.now += 3600
    pacer.end(pacer.begin("m", 300), delivered=300)
    assert pacer.wait_time("m", limits, 100) == 0
    # 200 more would exceed 1000: wait until the 600 from t=0 leave the day.
    assert pacer.wait_time("m", limits, 200) == 86_400 - 3600


def test_concurrency_and_pause() -> None:
    clock = Clock()
    pacer = Pacer(clock=clock)
    limits = PaceLimits(concurrency=3)
    slots = [pacer.begin("m", 1) for _ in range(3)]
    assert pacer.wait_time("m", limits, 1) > 0
    assert pacer.end(slots[0], delivered=0) is None  # a failed message does not count
    assert pacer.wait_time("m", limits, 1) == 0
    pacer.pause("m", 120)
    assert pacer.wait_time("m", limits, 1) == 120


def test_windows_survive_a_restart() -> None:
    clock = Clock()
    limits = PaceLimits(messages_per_window=2, window=60)
    pacer = Pacer(clock=clock)
    events = [pacer.end(pacer.begin("m", 1), delivered=1) for _ in range(2)]
    restarted = Pacer(clock=clock)
    restarted.load(PaceEvent(e.key, e.at, e.recipients) for e in events if e is not None)
    assert restarted.wait_time("m", limits, 1) == 60


def test_throttle_replies() -> None:
    for reply in (
        "432 4.3.2 Concurrent connections limit exceeded.",
        "451 4.7.500 Server busy",
        "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
        "429 TooMany",
    ):
        assert is_throttle_reply(reply)
    assert not is_throttle_reply("550 5.1.1 User unknown")


def test_messages_in_flight_count() -> None:
    clock = Clock()
    pacer = Pacer(clock=clock)
    limits = PaceLimits(messages_per_window=2, window=60, concurrency=10)
    first, second = pacer.begin("m", 1), pacer.begin("m", 1)
    assert pacer.wait_time("m", limits, 1) == 60  # two are on their way: the third waits
    pacer.end(first, delivered=0)
    assert pacer.wait_time("m", limits, 1) == 0  # one failed: it does not use the window
    assert second.key == "m"
