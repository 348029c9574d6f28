"""``relay365 advise``: Microsoft's decision guide (the seed article) as a function.

The article (https://learn.microsoft.com/en-us/exchange/mail-flow-best-practices/how-to-set-up-a-
multifunction-device-or-application-to-send-email-using-microsoft-365-or-office-365, "Compare the
options") compares three options in one table; its rows are the reasons given here (``ROW_*``).
Microsoft's order of preference is kept: option 1 (SMTP AUTH client submission) when the device can do
it, option 2 (Direct Send) when only internal recipients matter, option 3 (connector relay) for external
recipients from a static IP. When the device itself cannot use any option, relay365 sits in front of
it: the device speaks whatever it can (port 465, no TLS 1.2, no OAuth) to relay365 on the LAN, and
relay365 delivers by submission, Direct Send, connector or Graph ``sendMail`` (not in the article's
table; facts from exchange-online.md), in that order of preference.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, fields
from typing import Any

from relay365.errors import ConfigError

# The rows of the article's comparison table ("Compare the options").
ROW_EXTERNAL = "Relay to internet via Microsoft 365 or Office 365"
ROW_ANTISPAM = "Bypasses antispam"
ROW_THIRD_PARTY = "Supports mail sent from applications hosted by a third party"
ROW_SENT_ITEMS = "Saves to Sent Items folder"
ROW_PORT = "Open network port"
ROW_TLS = "Device or application server must support TLS"
ROW_AUTH = "Requires authentication"
ROW_THROTTLING = "Throttling limits"

RECIPIENTS_PER_DAY = 10_000  # SMTP AUTH and Graph: per mailbox, rolling 24 h (Exchange Online limits)
MESSAGES_PER_DAY = 30 * 60 * 24  # 30 messages per minute


class Option(enum.StrEnum):
    SUBMISSION = "submission"
    DIRECT_SEND = "direct_send"
    CONNECTOR = "connector"
    GRAPH = "graph"


TITLES = {
    Option.SUBMISSION: "Option 1: SMTP AUTH client submission (smtp.office365.com)",
    Option.DIRECT_SEND: "Option 2: Direct Send (your MX endpoint, anonymous)",
    Option.CONNECTOR: "Option 3: SMTP relay through a connector (your MX endpoint, static IP)",
    Option.GRAPH: "Microsoft Graph sendMail (HTTPS, app permission Mail.Send)",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Answers:
    """The questions the article's comparison rests on."""

    external_recipients: bool
    tls12: bool
    oauth: bool
    port465_only: bool
    smtp_auth_disabled: bool
    reject_direct_send: bool
    static_ip: bool
    daily_messages: int = 0
    daily_recipients: int = 0
    sent_items: bool = False
    third_party_cloud: bool = False
    domain: str = "contoso.com"
    public_ip: str | None = None
    mailbox: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Answers:
        """Build from a JSON answers file; names the key of any bad value."""
        known = {f.name: f for f in fields(cls) if f.init}
        unknown = set(data) - set(known)
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(key, data[key], f"Unknown answer; known: {', '.join(sorted(known))}.")
        missing = [name for name in REQUIRED if name not in data]
        if missing:
            raise ConfigError(missing[0], None, "Answer missing.")
        for name, value in data.items():
            if name in BOOL_QUESTIONS and not isinstance(value, bool):
                raise ConfigError(name, value, "Not a boolean (true/false).")
            if name in ("daily_messages", "daily_recipients") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ConfigError(name, value, "Not a non-negative integer.")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# (field, question) in the order the interactive advisor asks them.
BOOL_QUESTIONS: dict[str, str] = {
    "external_recipients": "Must mail reach recipients outside your organization?",
    "tls12": "Does the device/application support TLS 1.2 or later?",
    "oauth": "Does the device/application support OAuth (XOAUTH2) for SMTP?",
    "port465_only": "Can the device only use port 465 (implicit TLS)?",
    "smtp_auth_disabled": "Is SMTP AUTH disabled in the tenant (and to stay so)?",
    "reject_direct_send": "Is RejectDirectSend turned on in the tenant?",
    "static_ip": "Does the device send from a static public IP that only your organization uses?",
    "sent_items": "Must copies of sent mail land in a mailbox's Sent Items folder?",
    "third_party_cloud": "Is the device/application hosted in a third-party cloud (Azure, AWS, ...)?",
}
INT_QUESTIONS: dict[str, str] = {
    "daily_messages": "How many messages per day (about)?",
    "daily_recipients": "How many recipients per day in total (about)?",
}
REQUIRED = tuple(k for k in BOOL_QUESTIONS if k not in ("sent_items", "third_party_cloud"))


@dataclass(frozen=True, slots=True)
class Candidate:
    """One option, used by the device directly or behind relay365, and why it does (not) fit."""

    option: Option
    via_relay365: bool
    blockers: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return not self.blockers

    @property
    def label(self) -> str:
        return f"relay365 -> {self.option.value}" if self.via_relay365 else f"device -> {self.option.value}"


def _volume_blockers(a: Answers) -> list[str]:
    out = []
    if a.daily_recipients > RECIPIENTS_PER_DAY:
        out.append(
            f"{ROW_THROTTLING}: {RECIPIENTS_PER_DAY:,} recipients per day per mailbox; "
            f"you need {a.daily_recipients:,}"
        )
    if a.daily_messages > MESSAGES_PER_DAY:
        out.append(f"{ROW_THROTTLING}: 30 messages per minute ({MESSAGES_PER_DAY:,} a day at most)")
    return out


def blockers(option: Option, a: Answers, *, via_relay365: bool) -> tuple[str, ...]:
    """Why ``option`` does not fit the answers (empty when it fits), each citing a comparison row."""
    out: list[str] = []
    if option is Option.SUBMISSION:
        if not via_relay365:
            if a.port465_only:
                out.append(f"{ROW_PORT}: 587 or 25; port 465 is not supported for SMTP AUTH submission")
            if not a.tls12:
                out.append(f"{ROW_TLS}: Required (TLS 1.2 or later)")
            if not a.oauth:
                out.append(
                    f"{ROW_AUTH}: the device has only Basic auth (password), disabled by default from the "
                    "end of December 2026 (550 5.7.30)"
                )
        if a.smtp_auth_disabled:
            out.append(f"{ROW_AUTH}: SMTP AUTH is disabled in the tenant")
        out.extend(_volume_blockers(a))
    elif option is Option.DIRECT_SEND:
        if a.external_recipients:
            out.append(f"{ROW_EXTERNAL}: No, Direct Send delivers only to your own mailboxes")
        if a.reject_direct_send:
            out.append("RejectDirectSend is on: anonymous mail from your domain is refused (550 5.7.68)")
        if a.port465_only and not via_relay365:
            out.append(f"{ROW_PORT}: port 25 only")
        if a.sent_items:
            out.append(f"{ROW_SENT_ITEMS}: No")
    elif option is Option.CONNECTOR:
        if not a.static_ip and not via_relay365:
            # A certificate-based connector needs no static IP, but the device itself would have to
            # present a TLS client certificate naming your domain; relay365 can (client_cert_file).
            out.append(
                f"{ROW_AUTH}: one or more static IP addresses, not shared with other organizations, "
                "or a TLS client certificate the device presents (certificate-based connector)"
            )
        if a.third_party_cloud:
            out.append(f"{ROW_THIRD_PARTY}: No (for example not directly from Microsoft Azure)")
        if a.port465_only and not via_relay365:
            out.append(f"{ROW_PORT}: port 25 only")
        if a.sent_items:
            out.append(f"{ROW_SENT_ITEMS}: No")
    elif option is Option.GRAPH:
        if not via_relay365:
            out.append("Graph is an HTTPS API: a device speaking SMTP needs relay365 in front")
        out.extend(_volume_blockers(a))
    return tuple(out)


# Microsoft's order for the device alone, then relay365's order of upstreams. Without a static IP the
# connector needs a public certificate naming your domain: Graph comes first then (an app registration
# is easier to get than a certificate), the certificate-based connector stays possible.
DEVICE_ORDER = (Option.SUBMISSION, Option.DIRECT_SEND, Option.CONNECTOR)
RELAY_ORDER = (Option.SUBMISSION, Option.DIRECT_SEND, Option.CONNECTOR, Option.GRAPH)
RELAY_ORDER_NO_STATIC_IP = (Option.SUBMISSION, Option.DIRECT_SEND, Option.GRAPH, Option.CONNECTOR)


def certificate_connector(option: Option, a: Answers) -> bool:
    """A connector that knows the sender by its TLS certificate, not by a static IP."""
    return option is Option.CONNECTOR and not a.static_ip


def title(option: Option, a: Answers) -> str:
    if certificate_connector(option, a):
        return (
            "Option 3: SMTP relay through a certificate-based connector (your MX endpoint, TLS certificate)"
        )
    return TITLES[option]


def _reasons(choice: Candidate, a: Answers) -> list[str]:
    o = choice.option
    out: list[str] = []
    if a.external_recipients:
        out.append(f"{ROW_EXTERNAL}: Yes" + (" (Graph sends to anyone)" if o is Option.GRAPH else ""))
    else:
        out.append("Send to recipients in your domain(s): Yes")
    if a.sent_items:
        out.append(f"{ROW_SENT_ITEMS}: Yes" + (" (saveToSentItems=true)" if o is Option.GRAPH else ""))
    if a.third_party_cloud:
        out.append(
            f"{ROW_THIRD_PARTY}: Yes" + (" (update SPF for the host's IP)" if o is Option.DIRECT_SEND else "")
        )
    if o is Option.SUBMISSION:
        out.append(f"{ROW_ANTISPAM}: Yes for mail to your own mailboxes")
        how = "relay365 uses OAuth" if choice.via_relay365 else "OAuth"
        out.append(f"{ROW_AUTH}: a licensed mailbox's login ({how})")
    elif o is Option.DIRECT_SEND:
        out.append(f"{ROW_AUTH}: none; {ROW_TLS}: Optional; no mailbox or licence needed")
        if a.daily_recipients > RECIPIENTS_PER_DAY:
            out.append(f"{ROW_THROTTLING}: higher than SMTP AUTH's 10,000 recipients a day")
    elif o is Option.CONNECTOR and not a.static_ip:
        out.append(
            f"{ROW_AUTH}: relay365's TLS client certificate, named after your domain, identifies you to a "
            "certificate-based connector (TlsSenderCertificateName); no static IP needed"
        )
    elif o is Option.CONNECTOR:
        out.append(f"{ROW_AUTH}: your static IP identifies you (connector); {ROW_TLS}: Optional")
    else:
        out.append("Works with SMTP AUTH disabled: an app token with Mail.Send over HTTPS (port 443)")
    if choice.via_relay365:
        out.append(_relay_reason(a))
    return out


def _relay_reason(a: Answers) -> str:
    what = []
    if a.port465_only:
        what.append("listens on port 465 for the device")
    if not a.tls12:
        what.append("accepts the device's older TLS (or none) on the LAN and uses TLS 1.2+ upstream")
    if not a.oauth:
        what.append("does OAuth so the device needs no Microsoft 365 password")
    what.append("queues and paces mail to Microsoft's limits so nothing is rejected for volume")
    return "relay365 in front: " + "; ".join(what)


@dataclass(frozen=True, slots=True)
class Recommendation:
    answers: Answers
    choice: Candidate
    rejected: tuple[Candidate, ...]
    alternatives: tuple[Candidate, ...]
    reasons: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def option(self) -> Option:
        return self.choice.option

    @property
    def via_relay365(self) -> bool:
        return self.choice.via_relay365


def recommend(a: Answers) -> Recommendation:
    """The article's decision for these answers (see the module docstring for the order)."""
    device = [Candidate(o, False, blockers(o, a, via_relay365=False)) for o in DEVICE_ORDER]
    order = RELAY_ORDER if a.static_ip else RELAY_ORDER_NO_STATIC_IP
    relay = [Candidate(o, True, blockers(o, a, via_relay365=True)) for o in order]
    warnings: list[str] = []
    choice = next((c for c in device if c.fits), None) or next((c for c in relay if c.fits), None)
    if choice is None:
        # Nothing fits every answer: the relay365 candidate with the fewest blockers, and say so.
        choice = min(relay, key=lambda c: (len(c.blockers), order.index(c.option)))
        warnings.append(
            "No Microsoft 365 option meets every answer; the closest is shown. For bulk mail the "
            "article suggests a bulk email provider. Unmet: " + "; ".join(choice.blockers)
        )
    considered = device + relay if choice.via_relay365 else device
    rejected = tuple(c for c in considered if c is not choice and not c.fits)
    alternatives = tuple(c for c in considered if c is not choice and c.fits)
    if choice.option in (Option.DIRECT_SEND, Option.CONNECTOR) and not a.static_ip:
        warnings.append(
            "Without a static IP, SPF cannot name your sender: mail is more likely filtered as spam"
        )
    if choice.option is Option.DIRECT_SEND or choice.option is Option.CONNECTOR:
        warnings.append(f"{ROW_ANTISPAM}: No, mail is filtered; publish the SPF record below")
    if choice.option is Option.CONNECTOR:
        warnings.append(
            "Connector relay uses Microsoft's high-risk delivery pool only under 'reasonable limits'"
        )
    if certificate_connector(choice.option, a):
        warnings.append(
            "The certificate must come from a public CA, name one of your accepted domains (CN or SAN) and "
            "allow client authentication; the connector's TlsSenderCertificateName must match it "
            "(relay365 doctor checks all of this)"
        )
    if not choice.via_relay365 and choice.option is Option.SUBMISSION and a.daily_messages > 30 * 60:
        warnings.append("Over 30 messages in a minute are throttled: relay365 in front would pace them")
    return Recommendation(a, choice, rejected, alternatives, tuple(_reasons(choice, a)), tuple(warnings))
