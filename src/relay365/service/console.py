"""The one thin adapter between the running services and the console's interfaces (``admin/ports.py``).

It reads the services only through their status interfaces (``ingress.service.IngressStatus``,
``delivery.service.DeliveryStatus``) and the spool, and it is the only place that knows both sides.
It may import the tools (diagnostics, sandbox) because, like the rest of the composition root, it sits
above every layer.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from relay365.admin.ports import (
    CheckRow,
    ConsoleDeps,
    Headroom,
    MailboxMessage,
    SpfAdvice,
    TokenStatus,
    TransportStatus,
)
from relay365.delivery.service import DeliveryStatus
from relay365.errors import QueueEntryNotFound, SpoolError
from relay365.ingress.service import IngressStatus
from relay365.observability.activity import DeviceActivity
from relay365.observability.metrics import Metrics
from relay365.observability.tracking import EventKind, TraceQuery, TrackingLog
from relay365.settings import Settings
from relay365.spool.contract import Spool
from relay365.spool.model import QueueEntry, QueuePage, QueueQuery, QueueStats
from relay365.spool.wire import Unstuffer, unstuff
from relay365.transports.base import PacedTransport

if TYPE_CHECKING:
    from relay365.sandbox.store import MailStore, StoredMessage
    from relay365.tracing.follower import TraceFollower

HEAD_BYTES = 64 * 1024
RAW_CHUNK = 64 * 1024
_OUTCOMES = (EventKind.DELIVERED, EventKind.DEFERRED, EventKind.BOUNCED)


@dataclass(kw_only=True)
class RelayParts:
    """What the adapter reads: the running services' status and the spool, handed over by the
    composition root."""

    settings: Settings
    spool: Spool
    ingress: IngressStatus
    delivery: DeliveryStatus
    metrics: Metrics
    tracking: TrackingLog
    activity: DeviceActivity
    clock: Callable[[], float] = time.time
    explain: Callable[[str], str | None] = field(default=lambda reply: None)
    follower: TraceFollower | None = None  # Microsoft 365's side ([tracing]); None when off


class RelayStatus:
    def __init__(self, relay: RelayParts) -> None:
        self._relay = relay

    def now(self) -> float:
        return self._relay.clock()

    def listeners(self) -> dict[str, int]:
        return dict(self._relay.ingress.ports)

    def connections(self) -> int:
        return self._relay.ingress.connections()

    def delivery_stopped(self) -> str | None:
        return self._relay.delivery.delivery_stopped()

    async def transports(self) -> list[TransportStatus]:
        r = self._relay
        now = r.clock()
        suspended = r.delivery.suspended()
        out = []
        for t in r.settings.transports:
            transport = r.delivery.transports.get(t.name)
            last = await r.tracking.search(TraceQuery(transport=t.name, kinds=_OUTCOMES, limit=1))
            reply = last.events[0].reply if last.events else ""
            state = "idle" if not last.events else "ok"
            if last.events and last.events[0].kind is not EventKind.DELIVERED:
                state = "failing"
            if t.name in suspended:
                state = "held back"
            token = None
            source = getattr(transport, "token_source", None)
            if source is not None:
                s = source.state()
                token = TokenStatus(s.expires_at, s.last_refresh, s.last_error)
            pacing = None
            if isinstance(transport, PacedTransport):
                h = await r.delivery.headroom(transport)
                limits = transport.pacing
                pacing = Headroom(
                    key=transport.pacing_key,
                    messages_left=h.messages_left if h.paused_until <= now else 0,
                    window=limits.window,
                    recipients_left=h.recipients_left,
                    sessions_in_use=h.sessions_in_use,
                    sessions_max=limits.concurrency,
                )
            out.append(TransportStatus(t.name, t.type, state, suspended.get(t.name), reply, token, pacing))
        return out

    async def metrics(self) -> bytes:
        """Counters are counted where things happen; the gauges are set now: the queue's from the
        spool, each service's own through its status interface."""
        r = self._relay
        r.metrics.set_queue(await r.spool.stats(), r.clock())
        r.ingress.refresh_metrics()
        r.delivery.refresh_metrics()
        return r.metrics.exposition()


class SpoolQueueAdmin:
    def __init__(self, relay: RelayParts) -> None:
        self._relay = relay

    async def browse(self, query: QueueQuery) -> QueuePage:
        q = query
        return await self._relay.spool.query(q.where, limit=q.limit, order=q.order, cursor=q.cursor)

    async def get(self, queue_id: str) -> QueueEntry:
        return await self._relay.spool.get(queue_id)

    async def head(self, queue_id: str) -> bytes:
        entry = await self.get(queue_id)
        try:
            async with self._relay.spool.body(entry) as reader:
                head = await reader.read(HEAD_BYTES)
            return unstuff(head) if entry.stuffed else head
        except SpoolError:  # delivered and removed meanwhile, or unreadable: no headers to show
            return b""

    async def raw(self, queue_id: str) -> AsyncIterator[bytes]:
        entry = await self.get(queue_id)
        try:
            plain = Unstuffer() if entry.stuffed else None  # the message itself, not its wire form
            async with self._relay.spool.body(entry) as reader:
                async for chunk in reader.chunks(RAW_CHUNK):
                    yield plain.feed(chunk) if plain is not None else chunk
        except SpoolError:
            raise QueueEntryNotFound(queue_id) from None

    async def hold(self, queue_id: str, held: bool) -> None:
        await self._relay.spool.hold(queue_id, held)
        if not held:
            self._relay.delivery.wake()

    async def retry(self, queue_id: str) -> None:
        await self._relay.spool.retry(queue_id, self._relay.clock())
        self._relay.delivery.wake()

    async def delete(self, queue_id: str) -> None:
        await self._relay.spool.delete(queue_id)

    async def stats(self) -> QueueStats:
        return await self._relay.spool.stats()


class DiagnosticsSetup:
    """The doctor's relay and upstream checks, and the SPF record Microsoft documents for Direct Send
    and connectors ("v=spf1 ip4:<public IP> include:spf.protection.outlook.com ~all")."""

    def __init__(self, relay: RelayParts) -> None:
        self._relay = relay

    async def doctor(self) -> list[CheckRow]:
        from relay365.diagnostics.checks.trace_check import check_message_trace
        from relay365.diagnostics.doctor_config import (
            ConfigDoctorOptions,
            relay_checks,
            transport_auth,
            transport_network,
        )

        s = self._relay.settings
        opts = ConfigDoctorOptions(config=s.source or Path("relay365.toml"), timeout_s=10.0)
        jobs = [relay_checks(s, opts)]
        for t in s.transports:
            jobs.append(transport_network(t, timeout_s=opts.timeout_s))
            if t.type in ("submission", "graph"):
                jobs.append(transport_auth(t, timeout_s=opts.timeout_s))
        jobs.append(check_message_trace(s, timeout_s=opts.timeout_s))
        batches = await asyncio.gather(*jobs)
        return [CheckRow(r.name, r.status.value, r.detail, r.fix) for batch in batches for r in batch]

    def spf(self) -> list[SpfAdvice]:
        from relay365.diagnostics.spf import MICROSOFT_INCLUDE

        s = self._relay.settings
        domains: dict[str, str] = {}
        for t in s.transports:
            if t.type in ("direct_send", "connector"):
                for d in t.m365.accepted_domains:
                    domains.setdefault(d, f"{t.name} ({t.type}) sends from the relay's public address")
        for dev in s.devices:
            if dev.rewrite_sender and "@" in dev.rewrite_sender:
                domains.setdefault(dev.rewrite_sender.rpartition("@")[2], f"device {dev.name} sends as it")
        record = f"v=spf1 ip4:<public IP of this relay> {MICROSOFT_INCLUDE} ~all"
        check = "Check it with: relay365 spf --domain DOMAIN --ip PUBLIC_IP"
        return [SpfAdvice(d, record, f"{why}. {check}") for d, why in sorted(domains.items())]


class SandboxMailboxes:
    def __init__(self, store: MailStore, mailboxes: list[str]) -> None:
        self._store = store
        self._names = mailboxes

    @staticmethod
    def _message(m: StoredMessage) -> MailboxMessage:
        return MailboxMessage(
            m.id, m.mailbox, m.folder, m.mail_from, m.rcpt_tos, m.received_at, m.size, m.subject, m.headers
        )

    def mailboxes(self) -> list[str]:
        return sorted(set(self._names) | {m.mailbox for m in self._store.list()})

    def messages(self, mailbox: str | None, folder: str | None) -> list[MailboxMessage]:
        return [self._message(m) for m in self._store.list(mailbox, folder)]

    def message(self, message_id: str) -> MailboxMessage:
        from relay365.sandbox.store import MessageNotFound

        try:
            return self._message(self._store.get(message_id))
        except MessageNotFound as e:
            raise LookupError(message_id) from e

    def content(self, message_id: str) -> bytes:
        from relay365.sandbox.store import MessageNotFound

        try:
            return self._store.content(message_id)
        except MessageNotFound as e:
            raise LookupError(message_id) from e

    def version(self) -> float:
        try:
            return os.stat(self._store.root).st_mtime
        except OSError:
            return 0.0


def console_deps(relay: RelayParts, *, mailboxes: SandboxMailboxes | None = None) -> ConsoleDeps:
    return ConsoleDeps(
        status=RelayStatus(relay),
        queue=SpoolQueueAdmin(relay),
        tracking=relay.tracking,
        devices=relay.activity,
        setup=DiagnosticsSetup(relay),
        mailboxes=mailboxes,
        explain=relay.explain,
        post_acceptance=relay.follower.store if relay.follower is not None else None,
    )
