"""Exchange Online endpoint names (seed article; exchange-online.md)."""

from __future__ import annotations

SUBMISSION_HOST = "smtp.office365.com"  # option 1, port 587 (or 25); 465 unsupported


def mx_endpoint(domain: str) -> str:
    """The usual MX endpoint of an accepted domain (``contoso.com`` -> ``contoso-com.mail.protection.
    outlook.com``). The admin center's MX value is authoritative (newer tenants may differ)."""
    return domain.lower().rstrip(".").replace(".", "-") + ".mail.protection.outlook.com"
