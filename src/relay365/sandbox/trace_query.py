"""``$filter``, ``$top`` and ``$skiptoken`` of ``GET /admin/exchange/tracing/messageTraces``.

What Graph documents (https://learn.microsoft.com/graph/api/messagetracingroot-list-messagetraces,
https://learn.microsoft.com/graph/api/resources/exchangemessagetrace):

- filterable: ``receivedDateTime`` (``ge``, ``le``), ``fromIP``, ``id``, ``messageId``,
  ``recipientAddress``, ``senderAddress``, ``status``, ``toIP`` (``eq``), ``subject`` (``contains``,
  ``startsWith``, ``endsWith``); clauses combine with ``and``;
- a time period needs both bounds, ``receivedDateTime ge {start} and receivedDateTime le {end}``,
  ISO 8601 (``YYYY-MM-DDThh:mm:ssZ``); the interval must not exceed 10 days, the start must not be
  more than 90 days back, the end not later than now. Without a time filter: the last 48 hours;
- ``$top`` from 1 to 5000, 1000 by default; the next page is the whole ``@odata.nextLink`` URL.

Where the documentation is silent the sandbox chooses, and says so in its error messages: ``or``,
``not`` and any other operator are refused with 400 (a third-party report says Graph ignores ``or``
silently; refusing it keeps clients honest); a single time bound is refused; the end may be up to 5
minutes in the future (clock skew); strings compare without regard to case and a Message-ID matches
with or without its angle brackets; other query options (``$select``, ``$orderby``...) are refused.
Results are newest first; ``$skiptoken`` is an opaque cursor that also pins the time window, so new
mail does not shift the pages.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from relay365.sandbox.graph_wire import GraphError
from relay365.sandbox.trace import STATUSES, TraceRecord

DAY = 86400.0
MAX_INTERVAL = 10 * DAY
MAX_AGE = 90 * DAY
DEFAULT_PERIOD = 2 * DAY
CLOCK_SKEW = 300.0
DEFAULT_TOP = 1000
MAX_TOP = 5000

EQ_PROPERTIES = {
    "fromip": "fromIP",
    "id": "id",
    "messageid": "messageId",
    "recipientaddress": "recipientAddress",
    "senderaddress": "senderAddress",
    "status": "status",
    "toip": "toIP",
}
SUBJECT_FUNCTIONS = {"contains": "contains", "startswith": "startsWith", "endswith": "endsWith"}
ALLOWED_OPTIONS = frozenset({"$filter", "$top", "$skiptoken"})

_TOKEN = re.compile(
    r"\s*(?:(?P<string>'(?:[^']|'')*')|(?P<date>\d{4}-\d\d-\d\dT[0-9:.]+(?:Z|[+-]\d\d:\d\d)?)"
    r"|(?P<word>[A-Za-z_$][A-Za-z0-9_.]*)|(?P<punct>[(),]))"
)


def bad_request(message: str) -> GraphError:
    return GraphError(400, "BadRequest", message)


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise bad_request(f"Invalid filter clause: syntax error at position {position} in '{text}'.")
        kind = match.lastgroup or ""
        out.append((kind, match.group(kind)))
        position = match.end()
    return out


def parse_time(value: str) -> float:
    """An OData DateTimeOffset literal (``2026-01-20T00:00:00Z``) as epoch seconds (UTC if no zone)."""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise bad_request(f"The DateTimeOffset literal '{value}' is not valid.") from exc
    if moment.tzinfo is None:
        raise bad_request(f"The DateTimeOffset literal '{value}' needs a time zone ('Z' for UTC).")
    return moment.timestamp()


@dataclass
class TraceFilter:
    """A parsed ``$filter``: the time bounds, equality clauses and subject functions (all ANDed)."""

    start: float | None = None
    end: float | None = None
    equals: list[tuple[str, str]] = field(default_factory=list)
    subject: list[tuple[str, str]] = field(default_factory=list)

    def window(self, now: float) -> tuple[float, float]:
        """The time window to search, checked against Microsoft's rules."""
        if self.start is None and self.end is None:
            return now - DEFAULT_PERIOD, now
        if self.start is None or self.end is None:
            raise bad_request(
                "Specify both bounds of the time period: receivedDateTime ge {startDateTime} and "
                "receivedDateTime le {endDateTime}."
            )
        if self.start > self.end:
            raise bad_request("The start of the time period is after its end.")
        if self.end - self.start > MAX_INTERVAL:
            raise bad_request("The time period must not exceed 10 days.")
        if self.start < now - MAX_AGE:
            raise bad_request(
                "The start of the time period must not be more than 90 days before the current date."
            )
        if self.end > now + CLOCK_SKEW:
            raise bad_request("The end of the time period must not be later than the current date.")
        return self.start, self.end

    def matcher(self) -> Callable[[TraceRecord, str], bool]:
        """A predicate on (record, its status now)."""
        equals = [(name, _fold(name, value)) for name, value in self.equals]
        subject = [(func, value.casefold()) for func, value in self.subject]

        def match(record: TraceRecord, status: str) -> bool:
            values = {
                "fromIP": record.from_ip,
                "id": record.trace_id,
                "messageId": record.message_id,
                "recipientAddress": record.recipient,
                "senderAddress": record.sender,
                "status": status,
                "toIP": record.to_ip,
            }
            for name, wanted in equals:
                if _fold(name, values[name]) != wanted:
                    return False
            folded = record.subject.casefold()
            for func, value in subject:
                test = {"contains": value in folded, "startsWith": folded.startswith(value),
                        "endsWith": folded.endswith(value)}[func]  # fmt: skip
                if not test:
                    return False
            return True

        return match


def _fold(name: str, value: str) -> str:
    folded = value.strip().casefold()
    return folded.strip("<>") if name == "messageId" else folded


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.position = 0
        self.result = TraceFilter()

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self, kind: str | None = None, value: str | None = None) -> str:
        token = self.peek()
        if token is None or (kind and token[0] != kind) or (value and token[1].lower() != value):
            found = "the end" if token is None else f"'{token[1]}'"
            raise bad_request(f"Invalid filter clause: expected {value or kind} but found {found}.")
        self.position += 1
        return token[1]

    def expression(self) -> None:
        self.term()
        while (token := self.peek()) is not None and token[0] == "word" and token[1].lower() == "and":
            self.position += 1
            self.term()
        token = self.peek()
        if token is not None and token[1] != ")":
            if token[0] == "word" and token[1].lower() in ("or", "not"):
                raise bad_request(
                    f"Invalid filter clause: the '{token[1].lower()}' operator is not supported for "
                    "messageTraces; combine clauses with 'and' (send one request per alternative)."
                )
            raise bad_request(f"Invalid filter clause: unexpected '{token[1]}'.")

    def term(self) -> None:
        token = self.peek()
        if token == ("punct", "("):
            self.position += 1
            self.expression()
            self.take("punct", ")")
            return
        name = self.take("word")
        if name.lower() in ("not", "or"):
            raise bad_request(f"Invalid filter clause: the '{name.lower()}' operator is not supported.")
        if self.peek() == ("punct", "("):
            self.function(name)
            return
        operator = self.take("word").lower()
        kind, value = self.peek() or ("", "")
        self.position += 1
        prop = name.lower()
        if prop == "receiveddatetime":
            if operator not in ("ge", "le"):
                raise bad_request(
                    f"Invalid filter clause: receivedDateTime supports only ge and le, not '{operator}'."
                )
            if kind != "date":
                raise bad_request(
                    "A binary operator with incompatible types was detected. Found operand types "
                    "'Edm.DateTimeOffset' and 'Edm.String' for operator kind "
                    f"'{'GreaterThanOrEqual' if operator == 'ge' else 'LessThanOrEqual'}'."
                )
            moment = parse_time(value)
            if operator == "ge":
                self.result.start = moment if self.result.start is None else max(self.result.start, moment)
            else:
                self.result.end = moment if self.result.end is None else min(self.result.end, moment)
            return
        if prop not in EQ_PROPERTIES:
            raise bad_request(f"Invalid filter clause: the property '{name}' cannot be filtered on.")
        if operator != "eq":
            supported = EQ_PROPERTIES[prop]
            raise bad_request(f"Invalid filter clause: {supported} supports only eq, not '{operator}'.")
        text = _string(kind, value, EQ_PROPERTIES[prop])
        if prop == "status" and text.casefold() not in {s.casefold() for s in STATUSES}:
            raise bad_request(
                f"The value '{text}' is not valid for status; use one of {', '.join(STATUSES)}."
            )
        self.result.equals.append((EQ_PROPERTIES[prop], text))

    def function(self, name: str) -> None:
        func = SUBJECT_FUNCTIONS.get(name.lower())
        if func is None:
            raise bad_request(f"Invalid filter clause: the function '{name}' is not supported.")
        self.take("punct", "(")
        prop = self.take("word")
        if prop.lower() != "subject":
            raise bad_request(f"Invalid filter clause: {func} is supported only on subject, not '{prop}'.")
        self.take("punct", ",")
        kind, value = self.peek() or ("", "")
        self.position += 1
        self.result.subject.append((func, _string(kind, value, "subject")))
        self.take("punct", ")")


def _string(kind: str, value: str, prop: str) -> str:
    if kind != "string":
        raise bad_request(f"Invalid filter clause: {prop} needs a quoted string, not '{value}'.")
    return value[1:-1].replace("''", "'")


def parse_filter(text: str | None) -> TraceFilter:
    """Parse a ``$filter`` value (None or empty: no filter)."""
    if text is None or not text.strip():
        return TraceFilter()
    parser = _Parser(text)
    parser.expression()
    if parser.peek() is not None:
        raise bad_request("Invalid filter clause: unbalanced parentheses.")
    return parser.result


def parse_top(value: str | None) -> int:
    if value is None:
        return DEFAULT_TOP
    if not value.strip().isdigit() or not 1 <= int(value) <= MAX_TOP:
        raise bad_request(f"Invalid $top value '{value}': use a number from 1 to {MAX_TOP}.")
    return int(value)


@dataclass(frozen=True)
class Cursor:
    """Where the previous page ended, and the time window of the whole query."""

    start: float
    end: float
    received_at: float
    trace_id: str
    recipient: str

    def encode(self) -> str:
        raw = json.dumps([self.start, self.end, self.received_at, self.trace_id, self.recipient])
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            start, end, received_at, trace_id, recipient = json.loads(raw)
            return cls(float(start), float(end), float(received_at), str(trace_id), str(recipient))
        except (binascii.Error, ValueError, TypeError) as exc:
            raise bad_request("The $skiptoken is not valid; use the whole @odata.nextLink URL.") from exc

    def after(self, record: TraceRecord) -> bool:
        """Is ``record`` past this cursor in the newest-first order?"""
        mine = (-self.received_at, self.trace_id, self.recipient)
        return (-record.received_at, record.trace_id, record.recipient.lower()) > mine
