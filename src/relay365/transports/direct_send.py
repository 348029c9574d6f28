"""Direct Send (option 2): anonymous, port 25, to the tenant's MX endpoint, opportunistic TLS.

Only mailboxes in Exchange Online can be reached this way (external recipients are refused by
Microsoft), so this transport only takes recipients in the tenant's accepted domains; the router
sends others elsewhere or bounces them at once with a reason, never a blind try.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from relay365.settings import TransportSettings
from relay365.transports.base import OutboundMessage, RecipientResult, TransportKind
from relay365.transports.mx import MxDelivery


def domain_rule(domains: Iterable[str]) -> Callable[[str], bool]:
    """True for recipients in one of ``domains`` (the tenant's accepted domains)."""
    accepted = frozenset(d.lower() for d in domains)
    return lambda rcpt: rcpt.rpartition("@")[2].lower() in accepted


class DirectSendTransport:
    def __init__(self, settings: TransportSettings, *, helo_name: str) -> None:
        self.name = settings.name
        self.accepts = domain_rule(settings.m365.accepted_domains)
        self._mx = MxDelivery(
            settings, helo_name=helo_name, require_tls=settings.tls == "required", allowed=self.accepts
        )

    async def deliver(self, message: OutboundMessage) -> list[RecipientResult]:
        return await self._mx.deliver(self.name, message)

    async def close(self) -> None:
        await self._mx.close()


# The tenant's MX endpoint accepts <> like any MX; only the tenant's own domains are reachable.
KIND = TransportKind(
    type="direct_send",
    factory=lambda settings, helo: DirectSendTransport(settings, helo_name=helo),
    carries_null_sender=True,
    recipient_rule=lambda settings: domain_rule(settings.m365.accepted_domains),
)
