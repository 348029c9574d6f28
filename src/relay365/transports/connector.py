"""Connector relay (option 3): the tenant's MX endpoint on port 25 with STARTTLS required, known to an
inbound connector by our static IP or by our TLS client certificate (CN/SAN = an accepted domain).
External recipients are allowed.
"""

from __future__ import annotations

from relay365.settings import TransportSettings
from relay365.transports.base import OutboundMessage, RecipientResult, TransportKind
from relay365.transports.mx import MxDelivery


class ConnectorTransport:
    def __init__(self, settings: TransportSettings, *, helo_name: str) -> None:
        self.name = settings.name
        self._mx = MxDelivery(
            settings, helo_name=helo_name, require_tls=settings.tls != "none", allowed=lambda rcpt: True
        )

    async def deliver(self, message: OutboundMessage) -> list[RecipientResult]:
        return await self._mx.deliver(self.name, message)

    async def close(self) -> None:
        await self._mx.close()


# The tenant's MX endpoint accepts <> like any MX; a connector may relay to any recipient.
KIND = TransportKind(
    type="connector",
    factory=lambda settings, helo: ConnectorTransport(settings, helo_name=helo),
    carries_null_sender=True,
)
