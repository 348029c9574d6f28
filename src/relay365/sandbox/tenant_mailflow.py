"""What the tenant file says about mail flow after a message is accepted: published SPF records, the
public address Microsoft sees for a loopback peer, anti-spoofing, and mail flow rules.

::

    spoof_intelligence = true        # anti-phishing policy: EnableSpoofIntelligence (on by default)
    spoof_action = "junk"            # AuthenticationFailAction: "junk" (MoveToJmf, default) | "quarantine"

    [spf]                            # the TXT record each domain publishes (the sandbox has no DNS)
    "contoso.test" = "v=spf1 ip4:203.0.113.5 include:spf.protection.outlook.com ~all"

    [public_ip]                      # the peer as Microsoft would see it (your NAT's public address)
    "127.0.0.1" = "203.0.113.5"

    [[rule]]                         # a mail flow rule (transport rule); first match wins
    name = "Quarantine invoices"
    senders = ["billing@fabrikam.test", "@example.net"]   # From: or MAIL FROM address, or @domain
    subject_contains = ["invoice"]  # case-insensitive; any of them
    action = "quarantine"            # "quarantine" | "redirect" | "reject"
    redirect_to = "alice@contoso.test"   # for "redirect"

Sources: anti-phishing policy defaults (https://learn.microsoft.com/defender-office-365/
anti-phishing-policies-about#spoof-settings: "If the message is detected as spoof by spoof
intelligence": Move the message to the recipients' Junk Email folders, the default and Standard
action; Quarantine in Strict); mail flow rule conditions and actions
(https://learn.microsoft.com/exchange/security-and-compliance/mail-flow-rules/mail-flow-rule-actions:
"Redirect the message to" (RedirectMessageTo), "Deliver the message to the hosted quarantine"
(Quarantine), "Reject the message with the explanation" (RejectMessageReasonText, default
``5.7.1`` "Delivery not authorized, message refused"); conditions "The sender is", "The sender
domain is", "The subject includes any of these words"). A rule with several conditions needs all of
them, as in Exchange. Exchange applies every matching rule in priority order unless one says "Stop
processing more rules"; every sandbox rule ends processing, so the first match (file order) decides.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from relay365.errors import ConfigError

RuleAction = Literal["quarantine", "redirect", "reject"]
SpoofAction = Literal["junk", "quarantine"]
RULE_ACTIONS: tuple[RuleAction, ...] = ("quarantine", "redirect", "reject")
SPOOF_ACTIONS: tuple[SpoofAction, ...] = ("junk", "quarantine")


@dataclass(frozen=True)
class MailFlowRule:
    """One mail flow rule: conditions (all must match; an empty list is no condition) and one action."""

    name: str
    action: RuleAction
    senders: tuple[str, ...] = ()  # addresses, or "@domain" for "The sender domain is"
    subject_contains: tuple[str, ...] = ()
    redirect_to: str | None = None
    enabled: bool = True

    def matches(self, *, senders: tuple[str, ...], subject: str) -> bool:
        """Does the rule apply to a message from any of ``senders`` (From: and MAIL FROM) with ``subject``?"""
        if not self.enabled:
            return False
        if self.senders:
            wanted = [s.lower() for s in self.senders]
            found = [s.lower() for s in senders if s]
            if not any(_sender_matches(pattern, address) for pattern in wanted for address in found):
                return False
        if self.subject_contains:
            folded = subject.casefold()
            if not any(word.casefold() in folded for word in self.subject_contains):
                return False
        return True


def _sender_matches(pattern: str, address: str) -> bool:
    if pattern.startswith("@"):
        return address.rpartition("@")[2] == pattern[1:]
    return address == pattern


@dataclass(frozen=True)
class MailFlowSettings:
    """The tenant's post-acceptance settings (parsed from the tenant file)."""

    spf_records: Mapping[str, str]
    public_ips: Mapping[str, str]
    rules: tuple[MailFlowRule, ...]
    spoof_intelligence: bool
    spoof_action: SpoofAction


def _str_table(data: Mapping[str, Any], key: str) -> dict[str, str]:
    table = data.get(key, {})
    if not isinstance(table, dict):
        raise ConfigError(key, table, f"Use a [{key}] table.")
    for name, value in table.items():
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key}.{name}", value, "A non-empty string is required.")
    return {str(name): str(value) for name, value in table.items()}


def _strings(table: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{where}{key}", value, "Not a list of non-empty strings.")
    return tuple(v.strip() for v in value)


def _rule(table: Mapping[str, Any], where: str, is_address: Any) -> MailFlowRule:
    allowed = {"name", "action", "senders", "subject_contains", "redirect_to", "enabled"}
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}{key}", table[key], "Unknown key.")
    name = table.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}name", name, "A non-empty string is required.")
    action = table.get("action")
    if action not in RULE_ACTIONS:
        raise ConfigError(f"{where}action", action, f"Use one of {list(RULE_ACTIONS)}.")
    senders = tuple(s.lower() for s in _strings(table, "senders", where))
    for sender in senders:
        if "@" not in sender:
            raise ConfigError(f"{where}senders", sender, "Not an address or @domain.")
    subject = _strings(table, "subject_contains", where)
    if not senders and not subject:
        raise ConfigError(f"{where}name", name, "A rule needs senders or subject_contains.")
    redirect_to = table.get("redirect_to")
    if action == "redirect":
        if not isinstance(redirect_to, str) or not is_address(redirect_to):
            raise ConfigError(f"{where}redirect_to", redirect_to, "A redirect needs an email address.")
        redirect_to = redirect_to.strip().lower()
    elif redirect_to is not None:
        raise ConfigError(f"{where}redirect_to", redirect_to, "Only a redirect rule has redirect_to.")
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}enabled", enabled, "Not a valid bool.")
    return MailFlowRule(
        name=name.strip(),
        action=action,
        senders=senders,
        subject_contains=subject,
        redirect_to=redirect_to,
        enabled=enabled,
    )


def mail_flow_from_mapping(data: Mapping[str, Any]) -> MailFlowSettings:
    """The ``[spf]``, ``[public_ip]``, ``[[rule]]``, ``spoof_intelligence`` and ``spoof_action`` keys."""
    published = _str_table(data, "spf").items()
    spf = {domain.strip().lower().rstrip("."): record.strip() for domain, record in published}
    for domain, record in spf.items():
        if not record.lower().startswith("v=spf1"):
            raise ConfigError(f"spf.{domain}", record, "An SPF record starts with 'v=spf1' (RFC 7208 4.5).")
    public_ips: dict[str, str] = {}
    for peer, public in _str_table(data, "public_ip").items():
        for key, value in ((f"public_ip.{peer}", peer), (f"public_ip.{peer}", public)):
            try:
                ipaddress.ip_address(value.strip())
            except ValueError as exc:
                raise ConfigError(key, value, "Not an IP address.") from exc
        public_ips[str(ipaddress.ip_address(peer.strip()))] = str(ipaddress.ip_address(public.strip()))
    tables = data.get("rule", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("rule", tables, "Use [[rule]] tables.")
    rules = tuple(_rule(t, f"rule[{i}].", lambda a: "@" in a) for i, t in enumerate(tables))
    spoof = data.get("spoof_intelligence", True)
    if not isinstance(spoof, bool):
        raise ConfigError("spoof_intelligence", spoof, "Not a valid bool.")
    action = data.get("spoof_action", "junk")
    if action not in SPOOF_ACTIONS:
        raise ConfigError("spoof_action", action, f"Use one of {list(SPOOF_ACTIONS)}.")
    return MailFlowSettings(
        spf_records=spf,
        public_ips=public_ips,
        rules=rules,
        spoof_intelligence=spoof,
        spoof_action=action,
    )
