"""Find the codes in a reply, whatever form it arrives in.

Accepted forms: a full SMTP reply line (``550 5.7.60 SMTP; Client does not have ...``), a multi-line
reply (``535-5.7.139 ...``), a bare code (``5.7.60``, ``550``), a pasted NDR line (``Remote Server
returned '550 5.7.64 TenantAttribution; Relay Access Denied'``, ``#550 5.4.1 Recipient address
rejected ... ##``, ``<#5.1.1 smtp;550 5.1.1 ...>``), and a Microsoft Graph error as relay365 records it
(``403 ErrorSendAsDenied: The user account ...``: HTTP status, Graph ``error.code``, message).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ParsedReply", "parse_reply"]


@dataclass(frozen=True, slots=True)
class ParsedReply:
    """The parts of a reply: ``basic`` (550), ``enhanced`` ((5, 7, 60)) and the remaining text; for a
    Graph error ``http_status`` and ``graph_code`` instead (RFC 3463 codes do not apply to HTTP)."""

    basic: int | None
    enhanced: tuple[int, int, int] | None
    text: str
    http_status: int | None = None
    graph_code: str | None = None

    @property
    def enhanced_str(self) -> str | None:
        return None if self.enhanced is None else "{}.{}.{}".format(*self.enhanced)

    @property
    def reply_class(self) -> int | None:
        """2, 4 or 5 for an SMTP reply (RFC 5321 4.2.1, RFC 3463 2); None for Graph or no code."""
        if self.basic is not None:
            return self.basic // 100
        return None if self.enhanced is None else self.enhanced[0]


# A basic code followed by an enhanced code: "550 5.7.60", "535-5.7.139", "smtp;550 5.1.1".
_BOTH = re.compile(r"(?<![\d.])([2-5][0-5]\d)[ -]+#?([2-5])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# An enhanced code alone: "5.7.60", "#5.1.1". Digits or dots around it (an IP address) do not count.
_ENHANCED = re.compile(r"(?<![\d.])([2-5])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# A basic code alone, only where a reply starts: string start, after a quote, '#', ';', '<' or '('.
_BASIC = re.compile(r"(?:^|['\"#;<(]\s*)([2-5][0-5]\d)(?![\d.])")
# A Graph error: HTTP status, then an error code (Graph codes are PascalCase words), then ':'.
# https://learn.microsoft.com/graph/errors ("code": "ErrorSendAsDenied", "ApplicationThrottled", ...)
_GRAPH = re.compile(r"^\s*([1-5]\d\d) ([A-Z][A-Za-z0-9]+):\s*(.*)$", re.DOTALL)


def parse_reply(reply: str) -> ParsedReply:
    """Find the reply code and the enhanced status code in any of the accepted forms."""
    stripped = reply.strip()
    graph = _GRAPH.match(stripped)
    if graph and _ENHANCED.search(stripped) is None:
        return ParsedReply(None, None, graph.group(3).strip(), int(graph.group(1)), graph.group(2))
    both = _BOTH.search(stripped)
    if both:
        enhanced = (int(both.group(2)), int(both.group(3)), int(both.group(4)))
        return ParsedReply(int(both.group(1)), enhanced, stripped[both.end() :].strip(" ;'>#"))
    enh = _ENHANCED.search(stripped)
    basic = _BASIC.search(stripped)
    if enh:
        enhanced = (int(enh.group(1)), int(enh.group(2)), int(enh.group(3)))
        basic_code = int(basic.group(1)) if basic and basic.start(1) < enh.start() else None
        return ParsedReply(basic_code, enhanced, stripped[enh.end() :].strip(" ;'>#"))
    if basic:
        return ParsedReply(int(basic.group(1)), None, stripped[basic.end() :].strip(" ;'>#"))
    return ParsedReply(None, None, stripped)
