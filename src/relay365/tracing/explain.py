"""Microsoft's half of a message's story, explained: the reason a recipient ended in Junk Email, in
quarantine or failed after ``250``, and what the admin does about it.

- :func:`reason` turns a recipient's trace events (getDetailsByRecipient) into one line: the events
  after the receipt with their descriptions and the name/value pairs of their ``data``;
- :func:`advise` picks relay365's advice for a status and reason from ``advice.toml`` (data, with a
  public source per entry), or, for a failure that names an SMTP reply, from the reply catalogue;
- :func:`microsoft_half` and :func:`timeline` arrange tracking-log events for ``relay365 trace``,
  ``relay365 queue show`` and the console: relay events and Microsoft's in one timeline, and per
  recipient Microsoft's last word with its advice.

Core: imports the tracking log's model, the reply catalogue and this package only.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from relay365.errors import ConfigError
from relay365.observability.tracking import M365_KINDS, EventKind, TrackingEvent
from relay365.replies import Category, classify
from relay365.tracing.model import TraceDetail, TraceStatus

DATA_FILE = "advice.toml"
_MEP = re.compile(r'<MEP\s+Name="([^"]*)"\s+(?:String|Integer|Long|Double|Boolean)="([^"]*)"', re.IGNORECASE)
_REPLY = re.compile(r"\b[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}\b[^\]}\r\n]*")
_QUIET = ("receive", "submit")  # events that say nothing about the outcome


@dataclass(frozen=True, slots=True)
class Advice:
    text: str
    source: str

    def to_json(self) -> dict[str, str]:
        return {"text": self.text, "source": self.source}


@dataclass(frozen=True, slots=True)
class _Entry:
    status: TraceStatus
    markers: tuple[str, ...]
    needs: tuple[str, ...]
    text: str
    source: str


def _entry(raw: dict[str, Any], where: str) -> _Entry:
    unknown = set(raw) - {"status", "markers", "needs", "text", "source"}
    if unknown:
        raise ConfigError(f"{DATA_FILE} {where}", sorted(unknown)[0], "Unknown key.")
    status = TraceStatus.parse(raw.get("status"))
    if status is TraceStatus.UNKNOWN_FUTURE_VALUE or not raw.get("text") or not raw.get("source"):
        raise ConfigError(f"{DATA_FILE} {where}", raw.get("status"), "Needs a known status, text and source.")
    return _Entry(
        status=status,
        markers=tuple(str(m).casefold() for m in raw.get("markers", ())),
        needs=tuple(str(n) for n in raw.get("needs", ())),
        text=str(raw["text"]),
        source=str(raw["source"]),
    )


def load_advice(text: str) -> tuple[_Entry, ...]:
    data = tomllib.loads(text)
    return tuple(_entry(raw, f"advice[{i}]") for i, raw in enumerate(data.get("advice", [])))


@functools.cache
def _table() -> tuple[_Entry, ...]:
    return load_advice(resources.files("relay365.tracing").joinpath(DATA_FILE).read_text(encoding="utf-8"))


def mep(data: str) -> list[tuple[str, str]]:
    """The name/value pairs of a detail's ``data`` (``<root><MEP Name="CIP" String="..."/>...``)."""
    return _MEP.findall(data or "")


def describe(detail: TraceDetail) -> str:
    """One event as a line: its description, its action and the pairs of its data."""
    text = detail.description.strip()
    if detail.action and detail.action.casefold() not in text.casefold():
        text = f"{text} (action {detail.action})".strip()
    pairs = mep(detail.data)
    if pairs:
        text += " [" + ", ".join(f"{k}={v}" for k, v in pairs) + "]"
    return text


def reason(details: Sequence[TraceDetail]) -> str:
    """What Microsoft's events say about the outcome (the receipt left out)."""
    told = [d for d in details if d.event.strip().casefold() not in _QUIET]
    return "; ".join(f"{d.event}: {describe(d)}" for d in told)


def _spf_mechanism(ip: str) -> str | None:
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    return f"ip{address.version}:{address}"


def advise(status: str, why: str, *, ip: str = "", sender: str = "") -> Advice | None:
    """relay365's advice for a recipient Microsoft gave ``status`` (Graph's value or Exchange's name)
    for the reason ``why``; None when there is nothing to advise (delivered, or an unknown status)."""
    parsed = TraceStatus.parse(status)
    folded = why.casefold()
    found = _REPLY.search(why)
    if parsed is TraceStatus.FAILED and found:
        known = classify(found.group(0).strip())
        if known is not None and known.category is not Category.GENERIC:
            return Advice(f"{known.meaning} Fix: {known.fix}", known.source)
    domain = sender.rpartition("@")[2].lower() if "@" in sender else ""
    spf = _spf_mechanism(ip)
    values = {"ip": ip.strip(), "domain": domain, "spf": spf or "", "reply": found.group(0) if found else ""}
    for entry in _table():
        if entry.status is not parsed:
            continue
        if entry.markers and not any(m in folded for m in entry.markers):
            continue
        if any(not values.get(n) for n in entry.needs) or ("ip" in entry.needs and spf is None):
            continue
        return Advice(entry.text.format(**values), entry.source)
    return None


def event_advice(event: TrackingEvent) -> Advice | None:
    """The advice for an ``m365_status`` event (its status, reason, fromIP and sender)."""
    if event.kind is not EventKind.M365_STATUS:
        return None
    return advise(event.reply, event.detail, ip=event.peer, sender=event.sender)


def side(event: TrackingEvent) -> str:
    return "microsoft" if event.kind in M365_KINDS else "relay"


def event_dict(event: TrackingEvent) -> dict[str, Any]:
    """An event as JSON, with the side it comes from and, for Microsoft's status, the advice."""
    data = event.as_dict()
    data["kind"] = event.kind.value
    data["side"] = side(event)
    advice = event_advice(event)
    data["advice"] = advice.text if advice else None
    data["advice_source"] = advice.source if advice else None
    return data


def timeline(events: Iterable[TrackingEvent], *, newest_first: bool = False) -> list[TrackingEvent]:
    """Relay and Microsoft events in the order they happened. Microsoft's trace gives whole seconds
    (``2026-01-21T14:12:34Z``), so within one second the relay's events come first (its 250 reply is
    what Microsoft's events follow), then the tracking log's order."""

    def key(e: TrackingEvent) -> tuple[int, int, float, int]:
        return int(e.at), int(e.kind in M365_KINDS), e.at, e.id

    return sorted(events, key=key, reverse=newest_first)


def microsoft_half(events: Iterable[TrackingEvent]) -> list[dict[str, Any]]:
    """Per recipient, Microsoft's latest word (status, reason, advice) and its events, oldest first."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for e in timeline(e for e in events if e.kind in M365_KINDS):
        row = out.setdefault(
            (e.queue_id, e.recipient),
            {"queue_id": e.queue_id, "recipient": e.recipient, "transport": e.transport, "status": None,
             "at": None, "reason": "", "from_ip": "", "advice": None, "advice_source": None,
             "unresolved": False, "next_check": None, "events": []},
        )  # fmt: skip
        if e.kind is EventKind.M365_EVENT:
            row["events"].append({"at": e.at, "event": e.reply, "description": e.detail})
            continue
        advice = event_advice(e)
        row.update(
            status=e.reply, at=e.at, reason=e.detail, from_ip=e.peer or row["from_ip"],
            unresolved=e.kind is EventKind.M365_UNRESOLVED,
            advice=advice.text if advice else None, advice_source=advice.source if advice else None,
        )  # fmt: skip
    return list(out.values())
