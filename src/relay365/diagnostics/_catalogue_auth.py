"""Catalogue entries: authentication, sender permission, relay and throttling replies.

Each entry cites the Microsoft page (or RFC) it comes from. Order matters only between entries of the
same code: an entry with ``patterns`` wins when its text matches, otherwise the entry without patterns is
the default for that code. Specific codes win over ranges.
"""

from __future__ import annotations

from relay365.diagnostics._catalogue_sources import (
    BASIC_RETIRE,
    DIRECT_SEND,
    LEGACY_TLS,
    LIMITS,
    MFD,
    NDR,
    OAUTH,
    SMTP_AUTH,
    SOFT_DEFER,
)
from relay365.diagnostics.catalogue import CatalogueEntry as E
from relay365.diagnostics.catalogue import Category as C

AUTH_RELAY_THROTTLING: tuple[E, ...] = (
    # --- Authentication of relay365 / the device (SMTP AUTH, option 1) ---
    # 535 5.7.139 variants: exchange-online.md; SMTP_AUTH page ("Enable or disable SMTP AUTH").
    E(
        code="5.7.139",
        reply_code=535,
        category=C.AUTH,
        retryable=True,
        retry_after=300,
        source=SMTP_AUTH,
        patterns=("disabled for the Tenant",),
        text="Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant",
        meaning="SMTP AUTH is switched off for the whole tenant. " + SOFT_DEFER,
        fix="Set-TransportConfig -SmtpClientAuthenticationDisabled $false, or enable it only for the "
        "sending mailbox (Set-CASMailbox -SmtpClientAuthenticationDisabled $false); "
        "or use Graph / a connector.",
    ),
    E(
        code="5.7.139",
        reply_code=535,
        category=C.AUTH,
        retryable=True,
        retry_after=300,
        source=SMTP_AUTH,
        patterns=("disabled for the Mailbox",),
        text="Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox",
        meaning="SMTP AUTH is switched off for this mailbox. " + SOFT_DEFER,
        fix="Set-CASMailbox <mailbox> -SmtpClientAuthenticationDisabled $false (or $null to inherit).",
    ),
    E(
        code="5.7.139",
        reply_code=535,
        category=C.AUTH,
        retryable=True,
        retry_after=300,
        source=SMTP_AUTH,
        patterns=("security defaults",),
        text="Authentication unsuccessful, user is locked by your organization's security defaults policy",
        meaning="Entra ID Security Defaults block SMTP AUTH with a password. " + SOFT_DEFER,
        fix="Use OAuth (XOAUTH2) instead of a password, or replace Security Defaults with Conditional "
        "Access that excludes this account; or use Graph / a connector.",
    ),
    E(
        code="5.7.139",
        reply_code=535,
        category=C.AUTH,
        retryable=True,
        retry_after=300,
        source=SMTP_AUTH,
        text="Authentication unsuccessful, the request did not meet the criteria to be authenticated "
        "successfully",
        meaning="Exchange Online refused the login (Conditional Access, MFA, SMTP AUTH off). " + SOFT_DEFER,
        fix="Check the tenant and mailbox SMTP AUTH switches and the Conditional Access sign-in logs.",
    ),
    # 535 5.7.3: exchange-online.md; OAUTH page (XOAUTH2 failure).
    E(
        code="5.7.3",
        reply_code=535,
        category=C.AUTH,
        retryable=True,
        retry_after=300,
        source=OAUTH,
        text="Authentication unsuccessful [host]",
        meaning="The password or OAuth token was rejected (expired or wrong token, wrong scope, missing "
        "SMTP.SendAsApp permission, no FullAccess for the app's service principal). " + SOFT_DEFER,
        fix="Check the credential; for OAuth the scope https://outlook.office365.com/.default, the "
        "SMTP.SendAsApp permission, New-ServicePrincipal and Add-MailboxPermission -AccessRights FullAccess.",
    ),
    # 550 5.7.30: exchange-online.md; BASIC_RETIRE (Basic auth disabled by default from end of Dec 2026).
    E(
        code="5.7.30",
        reply_code=550,
        category=C.AUTH,
        retryable=True,
        retry_after=300,
        source=BASIC_RETIRE,
        text="Basic authentication is not supported for Client Submission.",
        meaning="The login used a password (Basic auth), which the tenant no longer accepts. " + SOFT_DEFER,
        fix="Switch the route to OAuth (XOAUTH2), Graph or a connector; re-enabling Basic is temporary.",
    ),
    # 530 5.7.57: exchange-online.md; NDR table row 5.7.57.
    E(
        code="5.7.57",
        reply_code=530,
        category=C.AUTH,
        retryable=True,
        retry_after=300,
        source=NDR,
        text="Client not authenticated to send mail. / Client was not authenticated to send anonymous mail "
        "during MAIL FROM",
        meaning="MAIL FROM was sent on smtp.office365.com without a successful AUTH. " + SOFT_DEFER,
        fix="Configure AUTH on the route (and STARTTLS first: AUTH is only offered after TLS).",
    ),
    # 421 4.7.66: LEGACY_TLS page.
    E(
        code="4.7.66",
        reply_code=421,
        category=C.TLS,
        source=LEGACY_TLS,
        text="TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to support TLS 1.2.",
        meaning="The client negotiated TLS 1.0/1.1; retrying with the same client will keep failing.",
        fix="Use TLS 1.2+ (put relay365 in front of the device), or the opt-in smtp-legacy.office365.com "
        "endpoint with Set-TransportConfig -AllowLegacyTLSClients $true.",
    ),
    # --- Sender permission ---
    # 550 5.7.60: MFD article (option 1 limitations) and exchange-online.md.
    E(
        code="5.7.60",
        reply_code=550,
        category=C.SENDER,
        source=MFD,
        text="SMTP; Client does not have permissions to send as this sender",
        meaning="MAIL FROM (or From:) is not the login mailbox and the login has no Send As right on it.",
        fix="Send as the login mailbox, or grant Send As (Add-RecipientPermission <sender> -Trustee <login> "
        "-AccessRights SendAs).",
    ),
    # 550 5.1.8: NDR table row 5.1.8.
    E(
        code="5.1.8",
        reply_code=550,
        category=C.REPUTATION,
        source=NDR,
        text="Access denied, bad outbound sender",
        meaning="The sending account is restricted for suspected outbound spam (often compromised).",
        fix="Secure the account, then release it in the Defender portal Restricted entities page.",
    ),
    # --- Relay and tenant attribution (options 2 and 3) ---
    # 550 5.7.64: exchange-online.md; NDR table row 5.7.64; MFD article (connector set-up).
    E(
        code="5.7.64",
        reply_code=550,
        category=C.RELAY,
        source=NDR,
        text="TenantAttribution; Relay Access Denied",
        meaning="Mail came in anonymously and no inbound connector matched the sending IP or certificate.",
        fix="Fix the OnPremises inbound connector: the public IP (SenderIPAddresses) or the certificate "
        "name (TlsSenderCertificateName) and a complete certificate chain.",
    ),
    # 550 5.7.68: exchange-online.md; DIRECT_SEND blog (RejectDirectSend).
    E(
        code="5.7.68",
        reply_code=550,
        category=C.RELAY,
        source=DIRECT_SEND,
        text="TenantInboundAttribution; Direct Send not allowed for this organization from "
        "unauthorized sources",
        meaning="RejectDirectSend is on: anonymous mail from an accepted domain is refused.",
        fix="Use a connector (IP or certificate), SMTP AUTH or Graph; or a partner inbound connector.",
    ),
    # 550 5.7.1 variants: exchange-online.md; NDR table row 5.7.1.
    E(
        code="5.7.1",
        reply_code=550,
        category=C.RELAY,
        source=NDR,
        patterns=("unable to relay",),
        text="Unable to relay",
        meaning="The server will not relay to this (external) recipient: Direct Send reaches only mailboxes "
        "of the tenant.",
        fix="Send to external recipients through SMTP AUTH, Graph or a connector relay (option 3).",
    ),
    E(
        code="5.7.1",
        reply_code=530,
        category=C.AUTH,
        retryable=True,
        retry_after=300,
        source=NDR,
        patterns=("client was not authenticated",),
        text="Client was not authenticated",
        meaning="The receiving server requires authentication before accepting the message. " + SOFT_DEFER,
        fix="Configure authentication on the route (or a connector for anonymous relay).",
    ),
    E(
        code="5.7.1",
        reply_code=550,
        category=C.SENDER,
        source=NDR,
        text="Delivery not authorized, message refused",
        meaning="The sender is not allowed to send to this recipient (restricted group, mail flow rule).",
        fix="Allow the sender on the recipient/group, or send with an authenticated identity.",
    ),
    # 5.7.12 / 5.7.124 / 5.7.133-136: NDR table rows.
    E(
        code="5.7.12",
        reply_code=550,
        category=C.SENDER,
        source=NDR,
        text="Sender was not authenticated by organization",
        meaning="The recipient only accepts mail from authenticated (internal) senders.",
        fix="Send authenticated (SMTP AUTH, Graph, connector), or allow external senders on the recipient.",
    ),
    E(
        code="5.7.124",
        reply_code=550,
        category=C.SENDER,
        source=NDR,
        text="Sender not in allowed-senders list",
        meaning="The recipient group accepts mail only from listed senders.",
        fix="Add the sender to the group's allowed senders (AcceptMessagesOnlyFrom).",
    ),
    E(
        code="5.7.133",
        reply_code=550,
        category=C.SENDER,
        source=NDR,
        text="Sender not authenticated for group",
        meaning="The group accepts only authenticated senders and this message was anonymous.",
        fix="Send authenticated, or set RequireSenderAuthenticationEnabled $false on the group.",
    ),
    E(
        code="5.7.134",
        reply_code=550,
        category=C.SENDER,
        source=NDR,
        text="Sender was not authenticated for mailbox",
        meaning="The mailbox accepts only authenticated senders and this message was anonymous.",
        fix="Send authenticated, or set RequireSenderAuthenticationEnabled $false on the mailbox.",
    ),
    E(
        code="5.7.135",
        reply_code=550,
        category=C.SENDER,
        source=NDR,
        text="Sender not authenticated for public folder",
        meaning="The mail-enabled public folder accepts only authenticated senders.",
        fix="Send authenticated, or allow anonymous senders on the public folder.",
    ),
    E(
        code="5.7.136",
        reply_code=550,
        category=C.SENDER,
        source=NDR,
        text="Sender was not authenticated",
        meaning="The mail user/contact accepts only authenticated senders.",
        fix="Send authenticated, or set RequireSenderAuthenticationEnabled $false on the recipient.",
    ),
    # --- Throttling and quotas ---
    # 432 4.3.2: exchange-online.md (SMTP AUTH concurrency) and NDR table row 4.3.2 (recipient thread limit).
    E(
        code="4.3.2",
        reply_code=432,
        category=C.THROTTLING,
        retry_after=60,
        source=LIMITS,
        patterns=("concurrent connections",),
        text="Concurrent connections limit exceeded.",
        meaning="More than 3 SMTP AUTH sessions at once for this mailbox.",
        fix="Fewer parallel sessions per mailbox (relay365 paces to 3).",
    ),
    E(
        code="4.3.2",
        reply_code=432,
        category=C.THROTTLING,
        retry_after=60,
        source=NDR,
        text="STOREDRV.Deliver; recipient thread limit exceeded",
        meaning="The recipient mailbox is receiving too much too fast and is throttled.",
        fix="Nothing to change: the message is retried.",
    ),
    # 554 5.2.0 variants: exchange-online.md (daily recipient limit); LIMITS (10,000 recipients/24 h).
    E(
        code="5.2.0",
        reply_code=554,
        category=C.THROTTLING,
        retryable=True,
        retry_after=3600,
        source=LIMITS,
        patterns=("submissionquota", "submission quota"),
        text="STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
        meaning="The mailbox used more than its 10,000 recipients per rolling 24 hours; the quota frees up "
        "as the window moves, so relay365 defers and slows this mailbox.",
        fix="Spread mail over more mailboxes/apps or use a connector for volume; lower the route's pace.",
    ),
    E(
        code="5.2.0",
        reply_code=554,
        category=C.RECIPIENT,
        source=NDR,
        text="STOREDRV.Deliver.Exception:QuotaExceededException",
        meaning="The recipient's mailbox store refused the message (over quota or another store error).",
        fix="The recipient frees space, then the message is resent.",
    ),
    # 5.1.90: NDR table row 5.1.90 ("reached your daily limit for message recipients").
    E(
        code="5.1.90",
        reply_code=550,
        category=C.THROTTLING,
        retryable=True,
        retry_after=3600,
        source=NDR,
        text="Your message can't be sent because you've reached your daily limit for message recipients",
        meaning="The sender hit the recipient rate limit; it resets within 24 hours, so relay365 defers.",
        fix="Lower the route's daily volume, or spread it over more senders.",
    ),
    # 5.2.121 / 5.2.122: NDR table; LIMITS (receiving limits, 3,600/hour, one third per sender).
    E(
        code="5.2.121",
        reply_code=550,
        category=C.THROTTLING,
        retryable=True,
        retry_after=3600,
        source=LIMITS,
        text="Recipient's per hour message receive limit from specific sender exceeded",
        meaning="Over 1,200 messages this hour from this sender to this recipient; resets after an hour.",
        fix="Batch notifications to one recipient; relay365 retries after the hour.",
    ),
    E(
        code="5.2.122",
        reply_code=550,
        category=C.THROTTLING,
        retryable=True,
        retry_after=3600,
        source=LIMITS,
        text="Recipient's per hour message receive limit exceeded",
        meaning="The recipient received more than 3,600 messages this hour; resets after an hour.",
        fix="Reduce volume to this recipient; relay365 retries after the hour.",
    ),
    # 5.2.2: exchange-online.md; NDR table row 5.2.2.
    E(
        code="5.2.2",
        reply_code=550,
        category=C.THROTTLING,
        retryable=True,
        retry_after=3600,
        source=NDR,
        patterns=("submission quota",),
        text="Submission quota exceeded",
        meaning="The sending mailbox exceeded the recipient rate limit (10,000 a day) or the message rate "
        "limit; the quota frees up over the rolling window, so relay365 defers and slows the mailbox.",
        fix="Lower the route's volume or spread it over more mailboxes; check for a compromised account.",
    ),
    E(
        code="5.2.2",
        reply_code=552,
        category=C.RECIPIENT,
        source=NDR,
        text="Mailbox full",
        meaning="The recipient's mailbox is full (RFC 3463 X.2.2).",
        fix="The recipient cleans up the mailbox; resend later.",
    ),
    # 5.7.232 / 5.7.233: NDR table (tenant external recipient rate limit, rolling 24 h).
    E(
        code="5.7.232",
        reply_code=550,
        category=C.THROTTLING,
        retryable=True,
        retry_after=3600,
        source=NDR,
        text="Your message can't be sent because your trial tenant has exceeded its daily limit for sending "
        "email to external recipients (tenant external recipient rate limit)",
        meaning="The trial tenant hit its external recipient rate limit; it resets over a rolling 24 hours.",
        fix="Wait for the window, or convert the trial to a paid subscription.",
    ),
    E(
        code="5.7.233",
        reply_code=550,
        category=C.THROTTLING,
        retryable=True,
        retry_after=3600,
        source=NDR,
        text="Your message can't be sent because your tenant exceeded its daily limit for sending email to "
        "external recipients (tenant external recipient rate limit)",
        meaning="The tenant hit its external recipient rate limit; it resets over a rolling 24 hours.",
        fix="Reduce external volume; relay365 retries when the window allows.",
    ),
)
