"""What Microsoft's message trace says, as relay365 reads it from Graph.

The resources are Graph v1.0's ``exchangeMessageTrace`` and ``exchangeMessageTraceDetail``
(https://learn.microsoft.com/graph/api/resources/exchangemessagetrace,
https://learn.microsoft.com/graph/api/resources/exchangemessagetracedetail); one record per message
and recipient, its ``id`` shared by the recipients of one message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class TraceStatus(StrEnum):
    """``exchangeMessageTraceStatus``: "The delivery status of the message." Graph sends the values in
    camelCase. ``recalled`` comes only with ``Prefer: include-unknown-enum-members``; a value this
    version does not know is kept as ``unknownFutureValue`` (Graph's evolvable-enum sentinel)."""

    GETTING_STATUS = "gettingStatus"
    PENDING = "pending"
    FAILED = "failed"
    DELIVERED = "delivered"
    EXPANDED = "expanded"
    QUARANTINED = "quarantined"
    FILTERED_AS_SPAM = "filteredAsSpam"
    RECALLED = "recalled"
    UNKNOWN_FUTURE_VALUE = "unknownFutureValue"

    @classmethod
    def parse(cls, value: object) -> TraceStatus:
        text = str(value or "")
        for status in cls:
            if status.value.casefold() == text.casefold():
                return status
        return cls.UNKNOWN_FUTURE_VALUE

    @property
    def display(self) -> str:
        """The name Exchange shows (Get-MessageTraceV2, the admin center): ``FilteredAsSpam``."""
        return self.value[:1].upper() + self.value[1:]

    @property
    def final(self) -> bool:
        """Will this recipient's status still change? gettingStatus ("waiting for status update") and
        pending ("delivery is underway or was deferred and is being retried") will."""
        return self not in (TraceStatus.GETTING_STATUS, TraceStatus.PENDING)

    @property
    def after_acceptance_problem(self) -> bool:
        """Accepted with 250, yet not in the recipient's Inbox: what an admin wants explained."""
        return self in (TraceStatus.FAILED, TraceStatus.QUARANTINED, TraceStatus.FILTERED_AS_SPAM)


def parse_time(value: object) -> float:
    """A Graph DateTimeOffset (``2026-01-21T14:12:34Z``, fractions and offsets allowed) as epoch seconds."""
    text = str(value or "")
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def normalize_message_id(value: str) -> str:
    """A Message-ID for matching: without angle brackets and surrounding space, case-folded."""
    return value.strip().strip("<>").strip().casefold()


def message_id_literal(value: str) -> str:
    """A Message-ID as the trace stores it: in angle brackets (Graph's examples show them)."""
    bare = value.strip().strip("<>").strip()
    return f"<{bare}>"


@dataclass(frozen=True, slots=True)
class TraceDetail:
    """One event of a recipient's trace (getDetailsByRecipient)."""

    at: float
    event: str
    action: str
    description: str
    data: str

    @classmethod
    def from_graph(cls, data: Mapping[str, Any]) -> TraceDetail:
        return cls(
            at=parse_time(data.get("dateTime")),
            event=str(data.get("event") or ""),
            action=str(data.get("action") or ""),
            description=str(data.get("description") or ""),
            data=str(data.get("data") or ""),
        )

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "event": self.event, "action": self.action,
                "description": self.description, "data": self.data}  # fmt: skip


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One ``exchangeMessageTrace``: a message as one recipient saw it inside Microsoft 365."""

    trace_id: str
    message_id: str
    sender: str
    recipient: str
    received_at: float
    subject: str
    size: int
    from_ip: str
    to_ip: str
    status: TraceStatus

    @classmethod
    def from_graph(cls, data: Mapping[str, Any]) -> TraceRecord:
        size = data.get("size")
        return cls(
            trace_id=str(data.get("id") or ""),
            message_id=str(data.get("messageId") or ""),
            sender=str(data.get("senderAddress") or "").lower(),
            recipient=str(data.get("recipientAddress") or "").lower(),
            received_at=parse_time(data.get("receivedDateTime")),
            subject=str(data.get("subject") or ""),
            size=size if isinstance(size, int) else 0,
            from_ip=str(data.get("fromIP") or ""),
            to_ip=str(data.get("toIP") or ""),
            status=TraceStatus.parse(data.get("status")),
        )

    @property
    def key(self) -> tuple[str, str]:
        return normalize_message_id(self.message_id), self.recipient.lower()

    def to_json(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id, "message_id": self.message_id, "sender": self.sender,
            "recipient": self.recipient, "received_at": self.received_at, "subject": self.subject,
            "size": self.size, "from_ip": self.from_ip, "to_ip": self.to_ip, "status": self.status.value,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """What relay365 wants to know: what became of ``message_id`` for ``recipient``, handed to
    Microsoft at ``sent_at`` (epoch seconds, when the transport got 250/202). ``sender``: the envelope
    sender as Microsoft will record it, when known (narrows the query)."""

    message_id: str
    recipient: str
    sent_at: float
    sender: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return normalize_message_id(self.message_id), self.recipient.strip().lower()


@dataclass(frozen=True, slots=True)
class TraceResult:
    """The answer for one :class:`TraceRequest`: the record (None: not in the trace yet, or
    ``expired``: older than the 90 days the trace keeps) and its events when they were fetched."""

    request: TraceRequest
    record: TraceRecord | None
    details: tuple[TraceDetail, ...] = field(default=())
    expired: bool = False

    @property
    def status(self) -> TraceStatus | None:
        return self.record.status if self.record is not None else None

    @property
    def settled(self) -> bool:
        """Nothing more to ask: a final status, or gone from the trace (older than 90 days)."""
        return self.expired or (self.record is not None and self.record.status.final)

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly form (for a tracking log or ``--json`` output)."""
        return {
            "message_id": self.request.message_id,
            "recipient": self.request.recipient,
            "sent_at": self.request.sent_at,
            "expired": self.expired,
            "record": None if self.record is None else self.record.to_json(),
            "details": [d.to_json() for d in self.details],
        }
