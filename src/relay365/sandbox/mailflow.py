"""What Exchange Online does with a message after it said ``250`` (or Graph said ``202``).

Every message the submission endpoint, the MX endpoint and Graph accept goes through
:meth:`MailFlow.accept`, which decides per recipient where the copy goes, files it, and writes the
message trace (:mod:`.trace`):

1. Mail flow rules (:mod:`.tenant_mailflow`), first match wins: ``quarantine`` puts every
   recipient's copy in the hosted quarantine (``Quarantined``), ``redirect`` sends the message to the
   rule's address instead (the original recipient is ``expanded`` with a ``Redirect`` event),
   ``reject`` refuses it after acceptance (``Failed``, an NDR to a sender that can receive one).
2. Anti-spoofing for anonymous mail at the MX endpoint (Direct Send, :mod:`.sender_auth`): a message
   whose composite authentication fails is handled by the anti-phishing policy's spoof action, by
   default moved to the recipient's Junk Email folder (``FilteredAsSpam``) with
   ``X-MS-Exchange-Organization-SCL: 5`` (SCL 5-6 "spam": delivered to Junk Email by default,
   https://learn.microsoft.com/defender-office-365/anti-spam-spam-confidence-level-scl-about; which
   SCL EOP stamps on a spoof verdict is not documented, the sandbox uses 5), or quarantined.
   Everything else gets SCL 1 ("not spam") and lands in the Inbox (``Delivered``).
3. External recipients (connector relay, submission, Graph) leave the tenant: the "Internet" folder,
   ``Delivered`` with a ``Send external`` event.

MX mail gets the header fields EOP stamps on inbound messages
(https://learn.microsoft.com/defender-office-365/message-headers-eop-mdo): ``Authentication-Results``,
``X-MS-Exchange-Organization-SCL`` and ``X-Forefront-Antispam-Report`` (CIP, SCL, SFV, CAT, SFTY,
DIR), prepended to the bytes as received. Authenticated submission and Graph mail is not filtered
(internal mail from a mailbox) and is stored byte for byte as before.
"""

from __future__ import annotations

import builtins
import logging
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from email.utils import getaddresses
from typing import TYPE_CHECKING

from relay365.errors import Relay365Error
from relay365.sandbox.ndr import non_delivery_report
from relay365.sandbox.sender_auth import SenderVerdict, judge_sender
from relay365.sandbox.store import StoredMessage, parse_headers
from relay365.sandbox.trace import (
    DELIVERED,
    EXPANDED,
    FAILED,
    FILTERED_AS_SPAM,
    PENDING,
    QUARANTINED,
    TraceEvent,
    TraceRecord,
)

if TYPE_CHECKING:
    from relay365.sandbox.clock import Clock
    from relay365.sandbox.store import MailStore
    from relay365.sandbox.tenant import Tenant
    from relay365.sandbox.tenant_mailflow import MailFlowRule
    from relay365.sandbox.trace import TraceLog

logger = logging.getLogger(__name__)

# Mail flow rule "Reject the message with the explanation": default text and enhanced code
# (learn.microsoft.com/exchange/security-and-compliance/mail-flow-rules/mail-flow-rule-actions).
RULE_REJECTED = "550 5.7.1 Delivery not authorized, message refused"
SCL_SPAM = 5
SCL_CLEAN = 1


class NotQuarantined(Relay365Error):
    """A release was asked for a stored copy that is not in the quarantine."""


@dataclass(frozen=True)
class Submission:
    """One accepted message, as the endpoint that accepted it knows it."""

    endpoint: str  # "submission" | "mx" | "graph"
    mail_from: str
    recipients: tuple[str, ...]
    content: bytes
    authenticated_as: str | None
    client_ip: str  # the peer as Microsoft sees it; "" for Graph
    helo: str = ""
    connector: str | None = None  # the inbound connector that attributed MX mail
    sent_items_mailbox: str | None = None  # a copy in this mailbox's Sent Items
    deferred_seconds: float = 0.0  # over the per-minute rate: delivered this much later

    def __post_init__(self) -> None:
        if self.mail_from.strip() == "<>":  # aiosmtpd's null reverse-path (RFC 5321 4.5.5)
            object.__setattr__(self, "mail_from", "")


@dataclass(frozen=True)
class Accepted:
    """What :meth:`MailFlow.accept` did: the Message-ID it traced under, the trace id, the copies."""

    message_id: str
    trace_id: str
    stored: tuple[StoredMessage, ...]
    records: tuple[TraceRecord, ...]

    @property
    def internal_id(self) -> str:
        return self.stored[0].id if self.stored else secrets.token_hex(6)


def _first(headers: tuple[tuple[str, str], ...], name: str) -> str | None:
    return next((v for k, v in headers if k.lower() == name), None)


def _mep(**values: object) -> str:
    """Detail ``data`` in the form of Graph's example (``<root><MEP .../></root>``)."""
    parts = "".join(
        f'<MEP Name="{k}" {"Integer" if isinstance(v, int) else "String"}="{v}" />' for k, v in values.items()
    )
    return f"<root>{parts}</root>"


class MailFlow:
    """Routes accepted messages into folders and the message trace."""

    def __init__(
        self, *, tenant: Callable[[], Tenant], store: MailStore, trace: TraceLog, clock: Clock, host: str
    ) -> None:
        self._tenant = tenant
        self._store = store
        self._trace = trace
        self._clock = clock
        self._host = host

    def accept(self, sub: Submission) -> Accepted:
        """File ``sub`` for each recipient and trace it; returns the copies and trace records."""
        tenant = self._tenant()
        now = self._clock.now()
        headers = parse_headers(sub.content)
        subject = _first(headers, "subject") or ""
        header_from = next((a for _, a in getaddresses([_first(headers, "from") or ""]) if a), None)
        message_id = _first(headers, "message-id") or f"<{uuid.uuid4()}@{self._host}>"
        trace_id = str(uuid.uuid4())
        verdict: SenderVerdict | None = None
        content = sub.content
        if sub.endpoint == "mx":
            verdict = judge_sender(
                tenant,
                ip=sub.client_ip,
                mail_from=sub.mail_from,
                helo=sub.helo,
                header_from=header_from,
                connector=sub.connector is not None,
            )
            content = self._stamp(sub, verdict, tenant) + sub.content
        flow = _Flow(self, tenant, sub, content, message_id, trace_id, now, subject, verdict)
        senders = (header_from or "", sub.mail_from)
        rule = next((r for r in tenant.rules if r.matches(senders=senders, subject=subject)), None)
        seen: set[str] = set()
        for rcpt in sub.recipients:
            if rcpt.lower() not in seen:
                seen.add(rcpt.lower())
                flow.route(rcpt, rule)
        if rule is not None and rule.action == "reject":
            flow.bounce(RULE_REJECTED)
        if sub.sent_items_mailbox is not None:
            flow.file(sub.sent_items_mailbox, "SentItems", sub.content)
        self._trace.add(flow.records)
        return Accepted(message_id, trace_id, tuple(flow.stored), tuple(flow.records))

    def refuse_after_acceptance(self, sub: Submission, reply: str) -> Accepted:
        """Trace a message refused after it was accepted (Graph over the daily recipient limit):
        every recipient ``Failed`` with ``reply``; the caller files the NDR."""
        tenant = self._tenant()
        now = self._clock.now()
        headers = parse_headers(sub.content)
        message_id = _first(headers, "message-id") or f"<{uuid.uuid4()}@{self._host}>"
        flow = _Flow(
            self,
            tenant,
            sub,
            sub.content,
            message_id,
            str(uuid.uuid4()),
            now,
            _first(headers, "subject") or "",
            None,
        )
        for rcpt in dict.fromkeys(r.lower() for r in sub.recipients):
            flow.record(rcpt, [TraceEvent(now, "Fail", f"Reason: [{{LED={reply}}}]", status=FAILED)])
        self._trace.add(flow.records)
        return Accepted(message_id, flow.trace_id, (), tuple(flow.records))

    def release(self, stored_id: str) -> StoredMessage:
        """An admin releases a quarantined copy: it moves to the recipient's Inbox and the recipient's
        trace record gets a ``Release`` event and says Delivered (sandbox choice; Microsoft's header
        docs describe SFV:SKQ as "released from the quarantine and was sent to the intended
        recipients"). Raises MessageNotFound, or NotQuarantined for a copy outside the quarantine."""
        stored = self._store.get(stored_id)
        if stored.folder != "Quarantine":
            raise NotQuarantined(
                f"message {stored_id} is in {stored.mailbox}/{stored.folder}, not in quarantine"
            )
        moved = self._store.move(stored_id, "Inbox")
        record = self._trace.for_stored(stored_id)
        if record is not None:
            released = TraceEvent(
                self._clock.now(),
                "Release",
                "The message was released from quarantine by an administrator and delivered to the Inbox.",
                status=DELIVERED,
            )
            self._trace.append_event(record.trace_id, record.recipient, released)
        logger.info("released %s from quarantine to %s/Inbox", stored_id, moved.mailbox)
        return moved

    def _stamp(self, sub: Submission, verdict: SenderVerdict, tenant: Tenant) -> bytes:
        spoofed = verdict.spoofed and tenant.spoof_intelligence
        scl = SCL_SPAM if spoofed else SCL_CLEAN
        sfty = ("9.11" if verdict.intra_org else "9.22") if spoofed else ""
        report = (
            f"CIP:{verdict.ip};CTRY:;LANG:;SCL:{scl};SRV:;IPV:NLI;SFV:{'SPM' if spoofed else 'NSPM'};"
            f"H:{sub.helo};PTR:;CAT:{'SPOOF' if spoofed else 'NONE'};SFTY:{sfty};DIR:INB;"
        )
        lines = [
            f"Authentication-Results: {verdict.authentication_results()}",
            f"X-MS-Exchange-Organization-SCL: {scl}",
            f"X-Forefront-Antispam-Report: {report}",
        ]
        # What the client chose (HELO name, addresses) never breaks a stamped field: printable only.
        safe = ["".join(c for c in line if c.isprintable())[:998] for line in lines]
        return ("\r\n".join(safe) + "\r\n").encode("ascii", "replace")


class _Flow:
    """The routing of one message, recipient by recipient (used once, by MailFlow)."""

    def __init__(
        self,
        owner: MailFlow,
        tenant: Tenant,
        sub: Submission,
        content: bytes,
        message_id: str,
        trace_id: str,
        now: float,
        subject: str,
        verdict: SenderVerdict | None,
    ) -> None:
        self.owner, self.tenant, self.sub, self.content = owner, tenant, sub, content
        self.message_id, self.trace_id, self.now, self.subject = message_id, trace_id, now, subject
        self.verdict = verdict
        self.stored: builtins.list[StoredMessage] = []
        self.records: builtins.list[TraceRecord] = []
        self._redirected: set[str] = set()
        self._failed: builtins.list[str] = []

    def file(self, mailbox: str, folder: str, content: bytes | None = None) -> str:
        """Store one copy; returns its store id."""
        self.stored.append(
            self.owner._store.add(
                folder=folder,
                mailbox=mailbox,
                endpoint=self.sub.endpoint,
                mail_from=self.sub.mail_from,
                rcpt_tos=self.sub.recipients,
                authenticated_as=self.sub.authenticated_as,
                content=self.content if content is None else content,
            )
        )
        return self.stored[-1].id

    def record(self, recipient: str, events: builtins.list[TraceEvent], stored_id: str = "") -> None:
        receive = TraceEvent(
            self.now,
            "Receive",
            f"Message received by: {self.owner._host} via {self.sub.endpoint}"
            + (f" (connector {self.sub.connector})" if self.sub.connector else ""),
        )
        self.records.append(
            TraceRecord(
                trace_id=self.trace_id,
                message_id=self.message_id,
                sender=self.sub.mail_from.lower(),
                recipient=recipient.lower(),
                received_at=self.now,
                subject=self.subject,
                size=len(self.sub.content),
                from_ip=self.sub.client_ip,
                to_ip="",
                ready_at=self.now + self.tenant.limits.trace_status_delay_seconds,
                events=(receive, *events),
                stored_id=stored_id,
            )
        )

    def route(self, rcpt: str, rule: MailFlowRule | None) -> None:
        now = self.now
        if rule is not None:
            applied = TraceEvent(
                now,
                "Transport rule",
                f"Transport rule '{rule.name}' was applied: {rule.action}.",
                action=rule.action.capitalize(),
                data=_mep(RuleName=rule.name, Action=rule.action),
            )
            if rule.action == "quarantine":
                kept = self.file(rcpt, "Quarantine")
                quarantined = TraceEvent(
                    now,
                    "Quarantine",
                    f"The message was quarantined by the transport rule '{rule.name}'. An admin can "
                    "release it at https://security.microsoft.com/quarantine (kept 30 days).",
                    status=QUARANTINED,
                )
                self.record(rcpt, [applied, quarantined], kept)
                return
            if rule.action == "reject":
                self._failed.append(rcpt)
                fail = TraceEvent(now, "Fail", f"Reason: [{{LED={RULE_REJECTED}}}]", status=FAILED)
                self.record(rcpt, [applied, fail])
                return
            target = rule.redirect_to or rcpt
            redirect = TraceEvent(
                now,
                "Redirect",
                f"The message was redirected to {target} by the transport rule '{rule.name}'.",
                data=_mep(RedirectTo=target),
                status=EXPANDED,
            )
            self.record(rcpt, [applied, redirect])
            if target not in self._redirected:
                self._redirected.add(target)
                self.deliver(target)
            return
        self.deliver(rcpt)

    def deliver(self, rcpt: str) -> None:
        """The final destination of one recipient: outside the tenant, quarantine, Junk or Inbox."""
        now, sub = self.now, self.sub
        if not self.tenant.is_internal_address(rcpt):
            kept = self.file(rcpt, "Internet")
            domain = rcpt.rpartition("@")[2]
            sent = TraceEvent(
                now, "Send external", f"Message sent to the mail server of {domain}.", status=DELIVERED
            )
            self.record(rcpt, [sent], kept)
            return
        verdict = self.verdict
        if verdict is not None and verdict.spoofed and self.tenant.spoof_intelligence:
            diagnostics = TraceEvent(
                now,
                "Spam Diagnostics",
                f"Spoof: composite authentication failed (spf={verdict.spf} for {verdict.mailfrom_domain} "
                f"from {verdict.ip}; compauth=fail reason={verdict.reason}).",
                data=_mep(
                    CIP=verdict.ip,
                    SPF=verdict.spf,
                    MailFromDomain=verdict.mailfrom_domain,
                    FromDomain=verdict.from_domain,
                    CompAuth=verdict.compauth,
                    CompAuthReason=verdict.reason,
                    SCL=SCL_SPAM,
                    SFV="SPM",
                    CAT="SPOOF",
                ),
            )
            if self.tenant.spoof_action == "quarantine":
                kept = self.file(rcpt, "Quarantine")
                done = TraceEvent(
                    now,
                    "Quarantine",
                    "The message was quarantined as spoofed (anti-phishing "
                    "policy). An admin can release it at https://security.microsoft.com/"
                    "quarantine.",
                    status=QUARANTINED,
                )
            else:
                kept = self.file(rcpt, "JunkEmail")
                done = TraceEvent(
                    now,
                    "Deliver",
                    "The message was delivered to the Junk Email folder.",
                    action="MoveToJmf",
                    status=FILTERED_AS_SPAM,
                )
            self.record(rcpt, [diagnostics, done], kept)
            return
        kept = self.file(rcpt, "Inbox")
        events: builtins.list[TraceEvent] = []
        if sub.deferred_seconds > 0:
            deferred = "Over the per-minute submission rate: delivered in the following minute."
            events.append(TraceEvent(now, "Defer", deferred, status=PENDING))
        later = now + sub.deferred_seconds
        delivered = "The message was successfully delivered."
        events.append(TraceEvent(later, "Deliver", delivered, status=DELIVERED))
        self.record(rcpt, events, kept)

    def bounce(self, reply: str) -> None:
        """An NDR to the sender for the recipients a rule rejected (never for the null sender)."""
        sender = self.sub.mail_from
        if not self._failed or not sender:
            return
        original = BytesParser(policy=policy.default).parsebytes(self.sub.content)
        ndr = non_delivery_report(
            original=original,
            recipients=self._failed,
            reply=reply,
            reporting_host=self.owner._host,
            now=self.now,
        )
        folder = "Inbox" if self.tenant.is_internal_address(sender) else "Internet"
        self.stored.append(
            self.owner._store.add(
                folder=folder,
                mailbox=sender,
                endpoint=self.sub.endpoint,
                mail_from="",
                rcpt_tos=[sender],
                authenticated_as=None,
                content=ndr,
            )
        )
