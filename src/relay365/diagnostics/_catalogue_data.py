"""All entries of the reply-code catalogue (see :mod:`.catalogue`)."""

from __future__ import annotations

from relay365.diagnostics._catalogue_auth import AUTH_RELAY_THROTTLING
from relay365.diagnostics._catalogue_delivery import DELIVERY
from relay365.diagnostics._catalogue_extra import EXTRA
from relay365.diagnostics.catalogue import CatalogueEntry

ENTRIES: tuple[CatalogueEntry, ...] = AUTH_RELAY_THROTTLING + DELIVERY + EXTRA
