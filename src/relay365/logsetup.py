"""Logging for the service: one stderr handler whose filter redacts every secret."""

from __future__ import annotations

import logging
import sys

from relay365.credentials import Redactor

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str, redactor: Redactor) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(redactor)
    root = logging.getLogger()
    root.setLevel(level)
    root.addHandler(handler)
    # aiosmtpd logs every command line at INFO (AUTH lines included), and its warnings ("unrecognised
    # command") repeat what relay365's own refusal line says: keep it to errors.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    return handler
