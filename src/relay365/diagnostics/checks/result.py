"""The result type every doctor check returns (also used by the relay-config checks of the lead)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(enum.StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check: ``name`` says what was checked, ``detail`` what was found, ``fix`` what to do."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status.value, "detail": self.detail, "fix": self.fix}


def passed(name: str, detail: str, fix: str = "") -> CheckResult:
    return CheckResult(name, Status.PASS, detail, fix)


def warned(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, Status.WARN, detail, fix)


def failed(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, Status.FAIL, detail, fix)
