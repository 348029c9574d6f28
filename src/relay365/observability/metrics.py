"""What the relay counts, in its own Prometheus registry (one per Relay, so tests never share one).

Every service is handed the one ``Metrics`` and counts its own: ingress its replies and commits
(``accepted``, ``refused``), delivery its results and bounces (``results``, ``bounces``). The gauges are
set when ``/metrics`` is scraped: the queue's from the spool (``set_queue``), ingress's and delivery's
by each service (``refresh_metrics`` of ``IngressService`` and ``DeliveryService``).
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from relay365.spool.model import QueueStats

_REPLY = re.compile(r"^([45]\d\d)(?:[ -]([245]\.\d{1,3}\.\d{1,3})\b)?")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.accepted = Counter(
            "relay365_messages_accepted",
            "Messages queued and acknowledged with 250 (after fsync)",
            ["listener", "device"],
            registry=r,
        )
        self.refused = Counter(
            "relay365_smtp_refusals",
            "4xx and 5xx replies sent to devices, by reply code and enhanced status code",
            ["code", "status"],
            registry=r,
        )
        self.results = Counter(
            "relay365_delivery_results",
            "Per-recipient delivery attempt results, by transport and outcome",
            ["transport", "outcome"],
            registry=r,
        )
        self.bounces = Counter("relay365_bounces", "Delivery status notifications generated", registry=r)
        self.queue = Gauge(
            "relay365_queue_recipients", "Recipients in the queue, by state", ["state"], registry=r
        )
        self.held = Gauge("relay365_queue_held_messages", "Messages on hold", registry=r)
        self.oldest = Gauge(
            "relay365_queue_oldest_seconds",
            "Age of the oldest message that still has recipients to deliver (0: none)",
            registry=r,
        )
        self.connections = Gauge("relay365_connections", "Open device connections", registry=r)
        self.suspended = Gauge(
            "relay365_transport_suspended",
            "1 while a transport's mail is held back because its upstream is unreachable",
            ["transport"],
            registry=r,
        )
        # Post-acceptance (relay365.tracing's follower): what Microsoft 365 did with mail it accepted.
        # An alert on status="FilteredAsSpam" fires when scans start landing in Junk Email.
        self.m365_outcomes = Counter(
            "relay365_m365_outcomes",
            "Recipients whose final status in Microsoft 365's message trace was read, by that status "
            "(Delivered, FilteredAsSpam, Quarantined, Failed, Expanded, ...), route and transport",
            ["status", "route", "transport"],
            registry=r,
        )
        self.m365_unresolved = Counter(
            "relay365_m365_unresolved",
            "Recipients without a final status in Microsoft 365's message trace within [tracing] horizon",
            ["route", "transport"],
            registry=r,
        )
        self.m365_trace_allowed = Gauge(
            "relay365_m365_trace_allowed",
            "1 while the app registration may read Microsoft 365's message trace, 0 after a 403 "
            "(ExchangeMessageTrace.Read.All missing)",
            ["app"],
            registry=r,
        )
        self.delivery_stopped = Gauge(
            "relay365_delivery_stopped",
            "1 while all delivery is stopped because the spool cannot record delivery outcomes",
            registry=r,
        )

    def refusal(self, reply: str) -> None:
        """Count a 4xx/5xx reply by code and RFC 3463 status (``5.7.1`` and ``5.7.60`` are different
        problems); ``status`` is ``""`` for a reply without one."""
        m = _REPLY.match(reply)
        if m:
            self.refused.labels(m.group(1), m.group(2) or "").inc()

    def count_accepted(self, listener: str, device: str) -> None:
        """A message acknowledged with 250."""
        self.accepted.labels(listener, device).inc()

    def exposition(self) -> bytes:
        """The Prometheus text exposition of this registry (``/metrics``)."""
        return generate_latest(self.registry)

    def set_queue(self, stats: QueueStats, now: float) -> None:
        for state, count in stats.recipients.items():
            self.queue.labels(state).set(count)
        self.held.set(stats.held)
        self.oldest.set(max(0.0, now - stats.oldest) if stats.oldest is not None else 0.0)
