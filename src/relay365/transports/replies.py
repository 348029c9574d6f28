"""The transient/permanent decision for an upstream reply, made here and nowhere else.

RFC 5321 4.2.1: 4yz is transient, 5yz permanent. Exchange Online documents a few 5yz replies that a
sender should retry; the reply-code catalogue (``relay365.diagnostics.catalogue``) knows them and is
consulted when it is installed.
"""

from __future__ import annotations


def is_transient_reply(code: int, text: str) -> bool:
    try:
        from relay365.diagnostics.catalogue import is_transient
    except ImportError:
        return 400 <= code < 500
    return bool(is_transient(f"{code} {text}"))
