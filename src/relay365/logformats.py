"""Log line formats: ``text`` for a terminal, ``journal`` for systemd, ``json`` for log shippers.

- ``text``: ``2026-01-15 10:00:00,123 INFO relay365.ingress.server: queued ...`` (the historic format).
- ``journal``: ``<6>relay365.ingress.server: queued ...``: no timestamp (the journal stamps each entry)
  and the syslog priority as a ``<N>`` prefix, which journald strips and stores as PRIORITY=
  (sd-daemon(3), "SD_ERR ... prefixes"; systemd.exec(5) SyslogLevelPrefix=, on by default).
- ``json``: one JSON object per line: ``time`` (RFC 3339, UTC), ``level``, ``logger``, ``message``, the
  structured fields of the event (``queue_id``, ``peer``, ``device``, ...) and ``exc`` for a traceback.
  Written to the journal, each line also gets the ``<N>`` prefix (journald strips it, so the stored
  MESSAGE is pure JSON with the right PRIORITY).

``auto`` (the default) is ``journal`` when stderr is the journal stream systemd connected
(``JOURNAL_STREAM`` names its device and inode, systemd.exec(5) "Environment variables in spawned
processes"), else ``text``. Messages reach these formatters already redacted (the ``Redactor`` filter
sits on the handler); the JSON formatter redacts structured fields given through ``extra=`` as well.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, TextIO

LogFormat = Literal["auto", "text", "journal", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "text", "journal", "json")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# syslog(3) priorities as sd-daemon(3) defines its SD_* prefixes: 7 debug, 6 info, 5 notice, 4 warning,
# 3 err, 2 crit.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

# Structured fields of the relay's Postfix-style lines ("queued 0195A... from=<a@b> peer=10.0.0.5
# device=mfp ..."): read from the message, or given as ``extra={"peer": ...}`` to a log call.
FIELDS = (
    "queue_id", "peer", "device", "listener", "from", "to", "via", "outcome", "nrcpt", "size", "user",
    "command", "reply",
)  # fmt: skip
_INT_FIELDS = frozenset({"nrcpt", "size"})
# A queue id: 11 hex digits of milliseconds and 8 random ones (relay365.spool.model.new_queue_id).
_QUEUE_ID = re.compile(r"\b[0-9A-F]{19}\b")
_PAIR = re.compile(
    r"(?<![\w.-])(peer|device|listener|from|to|via|outcome|nrcpt|size|user|command|reply)="
    r"(<[^>]*>|'[^']*'|\"[^\"]*\"|[^\s,;]+)"
)


def syslog_priority(levelno: int) -> int:
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return 7


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    """The traceback, as ``logging.Formatter.format`` computes it (the redactor may have set it)."""
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    text = record.exc_text or ""
    if record.stack_info:
        text = (text + "\n" if text else "") + formatter.formatStack(record.stack_info)
    return text


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``; a traceback follows as lines with the same prefix, so that
    ``journalctl -p err`` shows it whole."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        text = f"{record.name}: {record.getMessage()}"
        extra = _exception_text(self, record)
        if extra:
            text += "\n" + extra
        return "\n".join(prefix + line for line in text.splitlines() or [""])


def event_fields(record: logging.LogRecord, message: str) -> dict[str, Any]:
    """The structured fields of one event: ``extra=`` attributes first, then what the message says."""
    out: dict[str, Any] = {}
    for name in FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            out[name] = value
    if "queue_id" not in out and (m := _QUEUE_ID.search(message)):
        out["queue_id"] = m.group(0)
    for key, raw in _PAIR.findall(message):
        if key in out:
            continue
        value = raw.rstrip(":")
        if value[:1] in "<'\"" and len(value) >= 2:
            value = value[1:-1]
        out[key] = int(value) if key in _INT_FIELDS and value.isdigit() else value
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``prefix`` adds the journal's ``<N>`` priority in front."""

    def __init__(self, *, prefix: bool = False, redact: Callable[[str], str] = lambda s: s) -> None:
        super().__init__()
        self._prefix = prefix
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        doc: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for key, value in event_fields(record, message).items():
            doc.setdefault(key, self._redact(value) if isinstance(value, str) else value)
        exc = _exception_text(self, record)
        if exc:
            doc["exc"] = exc
        line = json.dumps(doc, ensure_ascii=False, default=str)
        return f"<{syslog_priority(record.levelno)}>{line}" if self._prefix else line


def is_journal_stream(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` is the journal connection systemd set up (not a redirect of it)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def resolve_format(
    log_format: LogFormat, *, stream: TextIO, environ: Mapping[str, str] | None = None
) -> Literal["text", "journal", "json"]:
    """``auto`` made concrete: ``journal`` when ``stream`` is the journal, else ``text``."""
    if log_format == "auto":
        return "journal" if is_journal_stream(stream, environ) else "text"
    return log_format


def make_formatter(
    log_format: LogFormat,
    *,
    stream: TextIO,
    redact: Callable[[str], str],
    environ: Mapping[str, str] | None = None,
) -> logging.Formatter:
    fmt = resolve_format(log_format, stream=stream, environ=environ)
    if fmt == "json":
        return JsonFormatter(prefix=is_journal_stream(stream, environ), redact=redact)
    if fmt == "journal":
        return JournalFormatter()
    return logging.Formatter(TEXT_FORMAT)
