"""The Exchange Online reply-code catalogue: what a reply means, whether to retry, what the admin fixes.

One place decides transient versus permanent for every upstream reply relay365 meets (transports,
DSNs, logs and ``relay365 explain`` all call it). The entries live in :mod:`._catalogue_data`.

Public API::

    parse_reply(reply)  -> ParsedReply        the basic code, enhanced code and text of any reply form
    classify(reply)     -> CatalogueEntry | None
    is_transient(reply) -> bool               the one transient/permanent decision
    summary(reply)      -> str                one line for logs and DSNs: meaning and admin's fix
    entries()           -> tuple[CatalogueEntry, ...]

Accepted reply forms: a full SMTP reply line (``550 5.7.60 SMTP; Client does not have ...``), a multi-line
reply (``535-5.7.139 ...``), a bare code (``5.7.60``, ``550``), a pasted NDR line (``Remote Server returned
'550 5.7.64 TenantAttribution; Relay Access Denied'``, ``#550 5.4.1 Recipient address rejected ... ##``,
``<#5.1.1 smtp;550 5.1.1 ...>``) and, when no code is present, well-known texts
(``Concurrent connections limit exceeded``).

The transient/permanent decision (:func:`is_transient`):

1. A 4yz reply is transient (RFC 5321 section 4.2.1), whatever follows. This covers ``451 4.7.500-699``
   new-IP graylisting and ``432 4.3.2`` concurrency throttling.
2. A 5yz reply is permanent, except entries flagged ``retryable`` because Microsoft documents that the
   condition clears by itself or by an admin action that does not change the message:
   quotas that reset (``5.2.121``/``5.2.122`` hourly receive limits, ``554 5.2.0`` submission quota,
   ``5.1.90`` daily recipient limit) and **authentication of relay365 itself** (``535 5.7.3``,
   ``535 5.7.139``, ``550 5.7.30``, ``530 5.7.57``). A rejected token or a tenant switch concerns the
   relay's credentials, not the message: bouncing would throw away good mail during a token outage or
   while the admin fixes the setting. Like Postfix's ``smtp_sasl_auth_soft_bounce = yes`` (default),
   these defer; the queue's lifetime still bounds the wait and the catalogue's fix goes to the alert log.
3. When the basic code and the enhanced code disagree (Exchange Online sends ``554 4.3.2 mailbox busy``),
   the basic code decides, as RFC 3463 section 2 says the enhanced code only refines it.
4. A reply with no recognisable code (a dropped connection, a timeout) is transient: patience may deliver.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = [
    "CatalogueEntry",
    "Category",
    "ParsedReply",
    "classify",
    "entries",
    "is_transient",
    "parse_reply",
    "summary",
]


class Category(enum.StrEnum):
    AUTH = "authentication"
    RELAY = "relay / tenant attribution"
    SENDER = "sender permission"
    RECIPIENT = "recipient"
    THROTTLING = "throttling / quota"
    REPUTATION = "IP or sender reputation"
    POLICY = "anti-spam / authentication policy (SPF, DMARC)"
    SIZE = "message size / content"
    NETWORK = "network / routing"
    TLS = "TLS"
    GENERIC = "generic SMTP reply"


@dataclass(frozen=True, slots=True, kw_only=True)
class CatalogueEntry:
    """One documented reply. ``code`` is an enhanced status code (``5.7.60``), a range of details
    (``4.7.500-699``) or a basic reply code (``550``) for the generic fallbacks."""

    code: str
    reply_code: int
    text: str
    category: Category
    meaning: str
    fix: str
    source: str
    retryable: bool = False
    patterns: tuple[str, ...] = ()
    retry_after: float | None = None  # hint in seconds for the next attempt (throttling, graylisting)

    @property
    def transient(self) -> bool:
        """True when relay365 defers (retries) on this reply; False when it bounces."""
        return self.reply_code // 100 == 4 or self.retryable

    @property
    def typical_reply(self) -> str:
        """The reply as Exchange Online typically sends it, e.g. ``550 5.7.60 SMTP; Client does ...``."""
        if "." in self.code:
            return f"{self.reply_code} {self.code} {self.text}"
        return f"{self.reply_code} {self.text}"

    @property
    def is_range(self) -> bool:
        return "-" in self.code

    def covers(self, enhanced: tuple[int, int, int]) -> bool:
        """Whether this entry's enhanced code (or range) includes ``enhanced``."""
        parts = self.code.split(".")
        if len(parts) != 3:
            return False
        cls, subject = int(parts[0]), int(parts[1])
        if (cls, subject) != enhanced[:2]:
            return False
        low, _, high = parts[2].partition("-")
        return int(low) <= enhanced[2] <= int(high or low)


@dataclass(frozen=True, slots=True)
class ParsedReply:
    """The parts of a reply: ``basic`` (550), ``enhanced`` ((5, 7, 60)) and the remaining text."""

    basic: int | None
    enhanced: tuple[int, int, int] | None
    text: str

    @property
    def enhanced_str(self) -> str | None:
        return None if self.enhanced is None else "{}.{}.{}".format(*self.enhanced)

    @property
    def reply_class(self) -> int | None:
        if self.basic is not None:
            return self.basic // 100
        return None if self.enhanced is None else self.enhanced[0]


# A basic code followed by an enhanced code: "550 5.7.60", "535-5.7.139", "smtp;550 5.1.1".
_BOTH = re.compile(r"(?<![\d.])([2-5][0-5]\d)[ -]+#?([2-5])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# An enhanced code alone: "5.7.60", "#5.1.1". Digits or dots around it (an IP address) do not count.
_ENHANCED = re.compile(r"(?<![\d.])([2-5])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# A basic code alone, only where a reply starts: string start, after a quote, '#', ';', '<' or '('.
_BASIC = re.compile(r"(?:^|['\"#;<(]\s*)([2-5][0-5]\d)(?![\d.])")


def parse_reply(reply: str) -> ParsedReply:
    """Find the reply code and the enhanced status code in any of the accepted forms."""
    stripped = reply.strip()
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


def entries() -> tuple[CatalogueEntry, ...]:
    """Every catalogue entry, specific codes first."""
    from relay365.diagnostics._catalogue_data import ENTRIES

    return ENTRIES


def _pattern_match(entry: CatalogueEntry, text: str) -> bool:
    lowered = text.lower()
    return any(p.lower() in lowered for p in entry.patterns)


def _best(candidates: list[CatalogueEntry], text: str) -> CatalogueEntry | None:
    """Among entries for one code prefer one whose text patterns match, then a specific code, then a range."""
    if not candidates:
        return None
    matching = [e for e in candidates if e.patterns and _pattern_match(e, text)]
    if matching:
        return matching[0]
    plain = [e for e in candidates if not e.patterns]
    pool = plain or candidates
    pool.sort(key=lambda e: e.is_range)
    return pool[0]


def classify(reply: str) -> CatalogueEntry | None:
    """The catalogue entry that explains ``reply``, or None when nothing in the catalogue fits."""
    parsed = parse_reply(reply)
    all_entries = entries()
    if parsed.enhanced is not None:
        found = _best([e for e in all_entries if e.covers(parsed.enhanced)], reply)
        if found is not None:
            return found
    if parsed.basic is not None:
        code = str(parsed.basic)
        found = _best([e for e in all_entries if e.code == code], reply)
        if found is not None:
            return found
    if parsed.basic is None and parsed.enhanced is None:
        by_text = [e for e in all_entries if e.patterns and _pattern_match(e, reply)]
        return by_text[0] if by_text else None
    return None


def is_transient(reply: str) -> bool:
    """The transient (defer and retry) versus permanent (bounce) decision; see the module docstring."""
    parsed = parse_reply(reply)
    entry = classify(reply)
    reply_class = parsed.reply_class
    if reply_class is None:
        # No code at all: a text-only match decides, anything else (timeouts, resets) is transient.
        return entry.transient if entry is not None else True
    if reply_class == 4:
        return True
    if reply_class == 5:
        return entry is not None and entry.retryable
    return False  # 2yz/3yz are not failures


def summary(reply: str) -> str:
    """One line for a log or a DSN: ``"5.7.60 (sender permission): <meaning> Fix: <fix>"``; for a reply
    not in the catalogue, the rule that was applied."""
    entry = classify(reply)
    if entry is None:
        verdict = "transient, retried" if is_transient(reply) else "permanent"
        return f"not in relay365's catalogue ({verdict} by its reply class)"
    return f"{entry.code} ({entry.category.value}): {entry.meaning} Fix: {entry.fix}"
