"""The reply-code catalogue (``catalogue.toml`` next to this module), loaded once, and its classifier.

Each ``[[reply]]`` entry of the data file names one reply of Exchange Online (or of Microsoft Graph, or a
generic RFC 5321 code) with its meaning, the admin's fix and the public page it comes from (``source``).

How a reply is matched (:func:`classify`), most specific first:

1. ``markers``: text that names one cause whatever code comes with it, such as Exchange's store
   driver exceptions (``SendAsDeniedException``, ``STOREDRV.ClientSubmit; sender thread limit
   exceeded``) or a Graph error code. Exchange sends the same enhanced code for different causes
   (``554 5.2.0`` for a denied Send As, a full mailbox and the daily quota), so the exception name
   decides. When several markers match, the longest (most specific) wins.
2. A Graph error (``403 ErrorSendAsDenied: ...``) by its error code.
3. The enhanced status code (``5.7.60``, or a range such as ``4.7.500-699``): among the entries for
   that code, one whose ``variants`` text matches, else the code's default entry (no variants), a
   specific code before a range.
4. The basic code (``550``): the generic RFC 5321 meaning.
5. No code at all: an entry whose ``variants`` text matches.

The transient/permanent decision (:func:`is_transient`):

1. A 4yz reply is transient (RFC 5321 section 4.2.1), whatever follows.
2. A 5yz reply is permanent, except entries flagged ``retryable`` because Microsoft documents that the
   condition clears by itself or by an admin action that does not change the message: quotas that
   reset, and the authentication of relay365 itself (a rejected token or a tenant switch concerns the
   relay's credentials, not the message; like Postfix's ``smtp_sasl_auth_soft_bounce = yes``).
3. When the basic code and the enhanced code disagree (``554 4.3.2``), the basic code decides (RFC
   3463 section 2: the enhanced code only refines it).
4. A reply with no recognisable code (a dropped connection, a timeout) is transient.
5. A Graph error is transient when its entry says so (``retryable``); an uncatalogued one by its HTTP
   status: 401, 408, 429 and 5xx are transient (https://learn.microsoft.com/graph/errors).
"""

from __future__ import annotations

import enum
import functools
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from relay365.errors import ConfigError
from relay365.replies.parse import ParsedReply, parse_reply

__all__ = ["Category", "ReplyEntry", "classify", "entries", "is_transient", "load_entries", "summary"]

DATA_FILE = "catalogue.toml"


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
    PROTOCOL = "SMTP command / sequence"
    GENERIC = "generic SMTP reply"


# The keys the data file uses for the categories.
CATEGORY_KEYS = {
    "auth": Category.AUTH,
    "relay": Category.RELAY,
    "sender": Category.SENDER,
    "recipient": Category.RECIPIENT,
    "throttling": Category.THROTTLING,
    "reputation": Category.REPUTATION,
    "policy": Category.POLICY,
    "size": Category.SIZE,
    "network": Category.NETWORK,
    "tls": Category.TLS,
    "protocol": Category.PROTOCOL,
    "generic": Category.GENERIC,
}
_SMTP_CODE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(-\d{1,3})?|[245][0-5]\d")
_GRAPH_CODE = re.compile(r"[A-Z][A-Za-z0-9]+")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyEntry:
    """One documented reply. ``code`` is an enhanced status code (``5.7.60``), a range of details
    (``4.7.500-699``), a basic reply code (``550``) or, for ``protocol = "graph"``, a Graph error code
    (``ErrorSendAsDenied``; ``reply`` is then the HTTP status)."""

    code: str
    reply_code: int
    text: str
    category: Category
    meaning: str
    fix: str
    source: str
    protocol: str = "smtp"
    retryable: bool = False
    variants: tuple[str, ...] = ()
    markers: tuple[str, ...] = ()
    retry_after: float | None = None  # hint in seconds for the next attempt (throttling, graylisting)

    @property
    def transient(self) -> bool:
        """True when relay365 defers (retries) on this reply; False when it bounces."""
        if self.protocol == "graph":
            return self.retryable
        return self.reply_code // 100 == 4 or self.retryable

    @property
    def typical_reply(self) -> str:
        """The reply as Exchange Online typically sends it, e.g. ``550 5.7.60 SMTP; Client does ...``."""
        if self.protocol == "graph":
            return f"{self.reply_code} {self.code}: {self.text}"
        if "." in self.code:
            return f"{self.reply_code} {self.code} {self.text}"
        return f"{self.reply_code} {self.text}"

    @property
    def is_range(self) -> bool:
        return "-" in self.code

    def covers(self, enhanced: tuple[int, int, int]) -> bool:
        """Whether this entry's enhanced code (or range) includes ``enhanced``."""
        parts = self.code.split(".")
        if self.protocol != "smtp" or len(parts) != 3:
            return False
        cls, subject = int(parts[0]), int(parts[1])
        if (cls, subject) != enhanced[:2]:
            return False
        low, _, high = parts[2].partition("-")
        return int(low) <= enhanced[2] <= int(high or low)

    def marker_in(self, folded: str) -> int:
        """The length of the longest of this entry's markers found in ``folded`` (0: none)."""
        return max((len(m) for m in self.markers if m.casefold() in folded), default=0)

    def variant_in(self, folded: str) -> bool:
        return any(v.casefold() in folded for v in self.variants)


_FIELDS = {
    "code": str,
    "reply": int,
    "category": str,
    "text": str,
    "meaning": str,
    "fix": str,
    "source": str,
    "protocol": str,
    "retryable": bool,
    "retry_after": int,
    "variants": list,
    "markers": list,
}
_REQUIRED = ("code", "reply", "category", "text", "meaning", "fix", "source")


def _entry(raw: dict[str, Any], where: str) -> ReplyEntry:
    for key, value in raw.items():
        kind = _FIELDS.get(key)
        if kind is None:
            raise ConfigError(f"{where}.{key}", value, "Unknown key.")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{where}.{key}", value, f"Not a valid {kind.__name__}.")
    for key in _REQUIRED:
        if key not in raw or raw[key] in ("", None):
            raise ConfigError(f"{where}.{key}", raw.get(key), "Every entry needs it.")
    protocol = raw.get("protocol", "smtp")
    code_format = _GRAPH_CODE if protocol == "graph" else _SMTP_CODE
    if protocol not in ("smtp", "graph") or not code_format.fullmatch(raw["code"]):
        raise ConfigError(f"{where}.code", raw["code"], f"Not a {protocol} reply code.")
    if raw["category"] not in CATEGORY_KEYS:
        raise ConfigError(f"{where}.category", raw["category"], f"Use one of {sorted(CATEGORY_KEYS)}.")
    if not str(raw["source"]).startswith("https://"):
        raise ConfigError(f"{where}.source", raw["source"], "A public https:// page is required.")
    texts = [*raw.get("variants", []), *raw.get("markers", [])]
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise ConfigError(f"{where}.markers", texts, "Markers and variants are non-empty strings.")
    return ReplyEntry(
        code=raw["code"],
        reply_code=raw["reply"],
        text=raw["text"],
        category=CATEGORY_KEYS[raw["category"]],
        meaning=raw["meaning"],
        fix=raw["fix"],
        source=raw["source"],
        protocol=protocol,
        retryable=raw.get("retryable", False),
        variants=tuple(raw.get("variants", ())),
        markers=tuple(raw.get("markers", ())),
        retry_after=float(raw["retry_after"]) if "retry_after" in raw else None,
    )


def load_entries(text: str) -> tuple[ReplyEntry, ...]:
    """Parse and validate a catalogue file's text; a bad entry raises ConfigError naming it."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(DATA_FILE, "", f"Not valid TOML: {exc}.") from exc
    unknown = set(data) - {"reply"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{DATA_FILE} {key}", data[key], "Unknown key; entries are [[reply]] tables.")
    return tuple(_entry(raw, f"{DATA_FILE} reply[{i}]") for i, raw in enumerate(data.get("reply", [])))


@functools.cache
def entries() -> tuple[ReplyEntry, ...]:
    """Every catalogue entry, in file order (loaded once per process)."""
    text = resources.files("relay365.replies").joinpath(DATA_FILE).read_text(encoding="utf-8")
    return load_entries(text)


def _by_code(candidates: list[ReplyEntry], folded: str) -> ReplyEntry | None:
    """Among entries for one code: one whose variants match, else the code's default (an entry with
    neither variants nor markers), a specific code before a range."""
    if not candidates:
        return None
    matching = [e for e in candidates if e.variants and e.variant_in(folded)]
    if matching:
        return matching[0]
    plain = [e for e in candidates if not e.variants and not e.markers] or candidates
    return sorted(plain, key=lambda e: e.is_range)[0]


def _match(parsed: ParsedReply, folded: str) -> ReplyEntry | None:
    all_entries = entries()
    best = max(all_entries, key=lambda e: e.marker_in(folded))
    if best.marker_in(folded):
        return best
    if parsed.graph_code is not None:
        wanted = parsed.graph_code.casefold()
        return next((e for e in all_entries if e.protocol == "graph" and e.code.casefold() == wanted), None)
    if parsed.enhanced is not None:
        found = _by_code([e for e in all_entries if e.covers(parsed.enhanced)], folded)
        if found is not None:
            return found
    if parsed.basic is not None:
        code = str(parsed.basic)
        return _by_code([e for e in all_entries if e.protocol == "smtp" and e.code == code], folded)
    if parsed.enhanced is None:
        return next((e for e in all_entries if e.variants and e.variant_in(folded)), None)
    return None


def classify(reply: str) -> ReplyEntry | None:
    """The catalogue entry that explains ``reply``, or None when nothing in the catalogue fits."""
    return _match(parse_reply(reply), reply.casefold())


def is_transient(reply: str) -> bool:
    """The transient (defer and retry) versus permanent (bounce) decision; see the module docstring."""
    parsed = parse_reply(reply)
    entry = _match(parsed, reply.casefold())
    if parsed.http_status is not None:
        if entry is not None and entry.protocol == "graph":
            return entry.transient
        return parsed.http_status in (401, 408, 429) or parsed.http_status >= 500
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
