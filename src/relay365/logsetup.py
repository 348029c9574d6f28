"""Logging for the service: one stderr handler whose filter redacts every secret, in the format asked for
(``text``, ``journal`` or ``json``; ``auto``: ``journal`` under systemd, see ``relay365.logformats``)."""

from __future__ import annotations

import logging
import sys

from relay365.credentials import Redactor
from relay365.logformats import TEXT_FORMAT, LogFormat, make_formatter

FORMAT = TEXT_FORMAT


def configure_logging(level: str, redactor: Redactor, log_format: LogFormat = "auto") -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(log_format, stream=sys.stderr, redact=redactor.redact))
    handler.addFilter(redactor)
    root = logging.getLogger()
    root.setLevel(level)
    root.addHandler(handler)
    # aiosmtpd logs every command line at INFO (AUTH lines included), and its warnings ("unrecognised
    # command") repeat what relay365's own refusal line says: keep it to errors.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    return handler
