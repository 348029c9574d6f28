"""Predict ``550 5.7.60`` before it happens: senders a device may use that its mailbox cannot send as.

SMTP AUTH submission and Graph send as one mailbox; Exchange Online refuses any other envelope sender
or From: address unless that mailbox has Send As on it: ``550 5.7.60 SMTP; Client does not have
permissions to send as this sender`` at MAIL FROM, ``554 5.2.0 ... SendAsDeniedException`` after DATA,
Graph ``403 ErrorSendAsDenied`` (https://learn.microsoft.com/exchange/mail-flow-best-practices/
how-to-set-up-a-multifunction-device-or-application-to-send-email-using-microsoft-365-or-office-365,
option 1; Send As: https://learn.microsoft.com/exchange/recipients-in-exchange-online/
manage-permissions-for-recipients). A device's ``rewrite_sender`` makes envelope and From: that one
address; without it the device's ``allowed_senders`` are what reach the transport.

:func:`send_as_risks` reads a configuration (used by ``config check`` and ``doctor``);
:func:`sender_risk` judges one sender on one transport (``route test``). Both are pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay365.settings import DeviceSettings, RouteSettings, Settings, TransportSettings

MAILBOX_TRANSPORTS = ("submission", "graph")
NULL_SENDER = "<>"  # in allowed_senders: the null reverse-path (RFC 5321 4.5.5)


@dataclass(frozen=True, slots=True)
class SendAsRisk:
    """A device whose senders reach a transport that sends as another mailbox."""

    device: str
    senders: tuple[str, ...]  # the device's sender patterns that are not the mailbox
    transport: str
    kind: str  # "submission" | "graph"
    mailbox: str
    rewritten: bool  # the sender comes from the device's rewrite_sender

    @property
    def refusal(self) -> str:
        return "403 ErrorSendAsDenied" if self.kind == "graph" else "5.7.60"

    @property
    def message(self) -> str:
        senders = ", ".join(self.senders)
        how = "is rewritten to" if self.rewritten else "may send as"
        return (
            f"device '{self.device}' {how} {senders}; transport '{self.transport}' sends as "
            f"{self.mailbox}: Microsoft will refuse other senders with {self.refusal} unless "
            f"{self.mailbox} has Send As on them"
        )

    @property
    def fix(self) -> str:
        grant = (
            f"Add-RecipientPermission <sender> -Trustee {self.mailbox} -AccessRights SendAs "
            "(one per sender address)"
        )
        if self.rewritten:
            return f"Set rewrite_sender = \"{self.mailbox}\" on device '{self.device}', or {grant}"
        return f"Add rewrite_sender = \"{self.mailbox}\" to device '{self.device}', or {grant}"

    @property
    def addresses(self) -> tuple[str, ...]:
        """The explicit addresses among the senders (what a probe can try)."""
        return tuple(s for s in self.senders if "@" in s and not s.startswith("@"))


def _overlaps(a: str, b: str) -> bool:
    """Whether sender patterns ``a`` and ``b`` ("*", "@domain" or an address) share an address."""
    a, b = a.lower(), b.lower()
    if a == "*" or b == "*" or a == b:
        return True
    if a.startswith("@") and b.startswith("@"):
        return False
    if a.startswith("@"):
        return b.endswith(a)
    if b.startswith("@"):
        return a.endswith(b)
    return False


def _device_senders(device: DeviceSettings) -> tuple[tuple[str, ...], bool]:
    if device.rewrite_sender:
        return (device.rewrite_sender.lower(),), True
    return tuple(s.lower() for s in device.allowed_senders), False


def _unconditional(route: RouteSettings) -> bool:
    return not (route.recipient_domains or route.senders or route.devices or route.max_size)


def _reached(
    settings: Settings, device: DeviceSettings, senders: tuple[str, ...]
) -> list[tuple[str, tuple[str, ...]]]:
    """(transport name, the senders that can reach it) for every route this device can take,
    stopping at the first route that takes everything (first match wins)."""
    reached: list[tuple[str, tuple[str, ...]]] = []
    for route in settings.routes:
        if route.devices and device.name not in route.devices:
            continue
        passing = senders
        if route.senders:
            passing = tuple(s for s in senders if any(_overlaps(s, p) for p in route.senders))
            if not passing:
                continue
        reached += [(name, passing) for name in (route.transport, *route.fallbacks)]
        if _unconditional(route):
            break
    return reached


def _transport(settings: Settings, name: str) -> TransportSettings | None:
    try:
        return settings.transport(name)
    except KeyError:
        return None


def send_as_risks(settings: Settings) -> list[SendAsRisk]:
    """Every (device, mailbox transport) pair where the device may use a sender the mailbox is not."""
    risks: list[SendAsRisk] = []
    seen: set[tuple[str, str]] = set()
    for device in settings.devices:
        senders, rewritten = _device_senders(device)
        for name, passing in _reached(settings, device, senders):
            transport = _transport(settings, name)
            if transport is None or transport.type not in MAILBOX_TRANSPORTS or not transport.m365.mailbox:
                continue
            mailbox = transport.m365.mailbox.lower()
            # The null sender <> never reaches a mailbox transport (the router sends it elsewhere).
            others = tuple(s for s in passing if s not in (mailbox, NULL_SENDER))
            if others and (device.name, name) not in seen:
                seen.add((device.name, name))
                risks.append(
                    SendAsRisk(
                        device=device.name,
                        senders=others,
                        transport=name,
                        kind=transport.type,
                        mailbox=transport.m365.mailbox,
                        rewritten=rewritten,
                    )
                )
    return risks


def sender_risk(settings: Settings, *, transport: str, sender: str) -> str | None:
    """Why ``sender`` on ``transport`` will be refused for Send As, or None when it will not."""
    t = _transport(settings, transport)
    if t is None or t.type not in MAILBOX_TRANSPORTS or not t.m365.mailbox:
        return None
    if sender.lower() == t.m365.mailbox.lower() or sender in ("", NULL_SENDER):
        return None
    refusal = "403 ErrorSendAsDenied" if t.type == "graph" else "5.7.60"
    return (
        f"transport '{transport}' sends as {t.m365.mailbox}: Microsoft refuses <{sender}> with "
        f"{refusal} unless {t.m365.mailbox} has Send As on it (or the device rewrites the sender)"
    )
