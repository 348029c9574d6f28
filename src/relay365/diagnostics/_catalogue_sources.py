"""URLs of the pages the reply-code catalogue cites."""

from __future__ import annotations

# Microsoft pages cited below.
NDR = (
    "https://learn.microsoft.com/en-us/troubleshoot/exchange/email-delivery/ndr/"
    "non-delivery-reports-in-exchange-online"
)
MFD = (
    "https://learn.microsoft.com/en-us/exchange/mail-flow-best-practices/how-to-set-up-a-multifunction-"
    "device-or-application-to-send-email-using-microsoft-365-or-office-365"
)
SMTP_AUTH = (
    "https://learn.microsoft.com/en-us/exchange/clients-and-mobile-in-exchange-online/"
    "authenticated-client-smtp-submission"
)
OAUTH = (
    "https://learn.microsoft.com/en-us/exchange/client-developer/legacy-protocols/"
    "how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth"
)
BASIC_RETIRE = (
    "https://techcommunity.microsoft.com/blog/exchange/"
    "exchange-online-to-retire-basic-auth-for-client-submission-smtp-auth/4114750"
)
LEGACY_TLS = (
    "https://learn.microsoft.com/en-us/exchange/clients-and-mobile-in-exchange-online/"
    "opt-in-exchange-online-endpoint-for-legacy-tls-using-smtp-auth"
)
LIMITS = (
    "https://learn.microsoft.com/en-us/office365/servicedescriptions/exchange-online-service-description/"
    "exchange-online-limits"
)
DIRECT_SEND = (
    "https://techcommunity.microsoft.com/blog/exchange/introducing-more-control-over-direct-send-in-"
    "exchange-online/4408790"
)
OUTLOOK_515 = (
    "https://support.microsoft.com/en-au/topic/fix-ndr-error-550-5-7-515-in-outlook-com-"
    "34cfe8f8-6fbf-457e-9e8b-9e4dbaf4e0ef"
)
RFC5321 = "https://www.rfc-editor.org/rfc/rfc5321#section-4.2"
SOFT_DEFER = "relay365 defers (does not bounce) so no mail is lost while the admin fixes it; alert logged."
