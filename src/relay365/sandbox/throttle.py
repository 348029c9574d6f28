"""A mailbox's sending limits, on the sandbox clock: SMTP AUTH submission and Graph share them.

Source: "Message storage and concurrent connection throttling for SMTP Authenticated Submission"
(learn.microsoft.com/exchange/troubleshoot/send-emails/smtp-submission-improvements):

- up to three concurrent connections may send at the same time; beyond that "each connection will
  receive ``432 4.3.2 Concurrent connections limit exceeded.``";
- 30 messages per minute: "If the mailbox exceeds the per minute limit, then email delivery delays
  occur. Any excess in message submissions is throttled and successively carried over to the following
  minutes." (accepted, not refused: the sandbox accepts the message and counts it as throttled);
- 10,000 recipients per day (rolling 24 hours): "Exceeding the per day limit generates the following
  error message: ``554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException``".
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from relay365.sandbox.clock import Clock
from relay365.sandbox.tenant import Limits

DAY = 24 * 3600.0


class SubmissionThrottle:
    """Concurrent sender slots, the per-minute message window and the rolling daily recipient count."""

    def __init__(self, *, limits: Callable[[], Limits], clock: Clock) -> None:
        self._limits_of = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._slots: dict[str, set[int]] = {}
        self._peak: dict[str, int] = {}  # the most slots held at once, per mailbox
        self._messages: dict[str, deque[float]] = {}
        self._recipients: dict[str, deque[tuple[float, int]]] = {}

    # -- concurrent connections ---------------------------------------------------------------

    def acquire_slot(self, mailbox: str, session_id: int) -> bool:
        """Take one of the mailbox's concurrent sending slots for this session (idempotent)."""
        key = mailbox.lower()
        with self._lock:
            holders = self._slots.setdefault(key, set())
            if session_id in holders:
                return True
            if len(holders) >= self._limits_of().smtp_connections_per_mailbox:
                return False
            holders.add(session_id)
            self._peak[key] = max(self._peak.get(key, 0), len(holders))
            return True

    def release_slot(self, mailbox: str, session_id: int) -> None:
        """Give the slot back (the connection closed)."""
        with self._lock:
            self._slots.get(mailbox.lower(), set()).discard(session_id)

    def peak_slots(self, mailbox: str) -> int:
        """The most sending slots the mailbox held at the same time so far."""
        with self._lock:
            return self._peak.get(mailbox.lower(), 0)

    def slots_in_use(self, mailbox: str) -> int:
        with self._lock:
            return len(self._slots.get(mailbox.lower(), set()))

    # -- rates --------------------------------------------------------------------------------

    def recipients_left_today(self, mailbox: str) -> int:
        """How many more recipients the mailbox may send to in the rolling 24 hours."""
        now = self._clock.now()
        with self._lock:
            window = self._recipients.setdefault(mailbox.lower(), deque())
            while window and window[0][0] <= now - DAY:
                window.popleft()
            used = sum(count for _, count in window)
        return self._limits_of().recipients_per_day - used

    def record_message(self, mailbox: str, recipients: int) -> bool:
        """Count one accepted message. Returns True if it was over the per-minute rate (throttled)."""
        now = self._clock.now()
        key = mailbox.lower()
        with self._lock:
            minute = self._messages.setdefault(key, deque())
            while minute and minute[0] <= now - self._limits_of().submission_window_seconds:
                minute.popleft()
            throttled = len(minute) >= self._limits_of().messages_per_minute
            minute.append(now)
            self._recipients.setdefault(key, deque()).append((now, recipients))
        return throttled
