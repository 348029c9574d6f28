"""What upstream replies mean: the reply-code catalogue as data, and the one transient/permanent decision.

::

    catalogue.toml   one [[reply]] entry per code or text pattern: meaning, fix, public source
    parse.py         parse_reply(reply) -> ParsedReply: the codes of any reply or NDR form
    catalogue.py     classify(reply), is_transient(reply), summary(reply), entries()

Delivery (``transports``) asks :func:`is_transient` whether to retry; ``relay365 explain``, the doctor
and DSNs show :func:`classify`'s entry. Part of the relay's core: it imports nothing but ``errors``.
"""

from __future__ import annotations

from relay365.replies.catalogue import Category, ReplyEntry, classify, entries, is_transient, summary
from relay365.replies.parse import ParsedReply, parse_reply

__all__ = [
    "Category",
    "ParsedReply",
    "ReplyEntry",
    "classify",
    "entries",
    "is_transient",
    "parse_reply",
    "summary",
]
