"""The transient/permanent decision for an upstream reply, made here and nowhere else.

RFC 5321 4.2.1: 4yz is transient, 5yz permanent. Exchange Online documents a few 5yz replies that a
sender should retry; the reply-code catalogue (:mod:`relay365.replies`, a data file in the core) knows
them. Graph errors are decided by the same catalogue.
"""

from __future__ import annotations

from relay365.replies import is_transient


def is_transient_reply(code: int, text: str) -> bool:
    """True when an SMTP reply ``code text`` should be retried (deferred), False to bounce."""
    return is_transient(f"{code} {text}")


def is_transient_graph(status: int, code: str, message: str = "") -> bool:
    """True when a Graph error (HTTP ``status``, ``error.code``) should be retried."""
    return is_transient(f"{status} {code}: {message}")
