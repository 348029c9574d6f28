"""Faults on demand: make an endpoint answer a reply, stall or drop at a stage, for the next N attempts.

The pattern of aiosmtplib's own tests (a per-test server behaviour), available at run time: tests add
a ``Fault`` and the endpoints consult ``Faults.take(endpoint, stage)`` at every stage.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

ENDPOINTS = frozenset({"submission", "mx", "graph", "token"})
SMTP_STAGES = frozenset({"connect", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "after_data"})
HTTP_STAGES = frozenset({"request"})
ACTIONS = frozenset({"reply", "stall", "drop"})


class FaultError(ValueError):
    """A fault description that cannot be applied (unknown endpoint, stage or action)."""


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour.

    ``reply`` is an SMTP reply line ("421 4.3.2 Service not available") for SMTP endpoints, or the
    HTTP status as text ("503") for HTTP ones. ``stall_seconds`` delays the stage (action "stall"), after
    which the stage proceeds normally (or answers ``reply`` if one is given). ``times`` is how many
    attempts the fault applies to.
    """

    endpoint: str
    stage: str
    action: str = "reply"
    reply: str | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    stall_seconds: float = 0.0
    times: int = 1

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise FaultError(f"unknown endpoint {self.endpoint!r}; use one of {sorted(ENDPOINTS)}")
        stages = HTTP_STAGES if self.endpoint in {"graph", "token"} else SMTP_STAGES
        if self.stage not in stages:
            raise FaultError(f"unknown stage {self.stage!r} for {self.endpoint}; use one of {sorted(stages)}")
        if self.action not in ACTIONS:
            raise FaultError(f"unknown action {self.action!r}; use one of {sorted(ACTIONS)}")
        if self.action == "reply" and not self.reply:
            raise FaultError("action 'reply' needs a reply")
        if self.times < 1:
            raise FaultError("times must be at least 1")
        if self.stall_seconds < 0:
            raise FaultError("stall_seconds must not be negative")


class Faults:
    """The pending faults, consumed in the order they were added. Thread-safe."""

    def __init__(self) -> None:
        self._pending: list[Fault] = []
        self._lock = threading.Lock()

    def add(self, fault: Fault) -> None:
        """Queue a fault for its endpoint and stage."""
        with self._lock:
            self._pending.append(fault)

    def take(self, endpoint: str, stage: str) -> Fault | None:
        """The first pending fault for this endpoint and stage, counting one attempt against it."""
        with self._lock:
            for index, fault in enumerate(self._pending):
                if fault.endpoint == endpoint and fault.stage == stage:
                    if fault.times <= 1:
                        del self._pending[index]
                    else:
                        self._pending[index] = replace(fault, times=fault.times - 1)
                    return fault
        return None

    def pending(self) -> list[Fault]:
        """A snapshot of the faults still to be applied."""
        with self._lock:
            return list(self._pending)

    def clear(self) -> None:
        """Forget every pending fault."""
        with self._lock:
            self._pending.clear()
