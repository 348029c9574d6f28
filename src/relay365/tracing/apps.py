"""Which transports relay365 follows into Microsoft's message trace, and with which app registration.

Reading the trace takes an app-only Graph token with the application permission
``ExchangeMessageTrace.Read.All`` (https://learn.microsoft.com/graph/api/messagetracingroot-list-messagetraces,
"Permissions"). So:

- a ``submission`` or ``graph`` transport with app-only credentials (a client secret or a certificate)
  reads the trace with its own app registration (the same one that sends; it needs the permission
  too);
- a ``direct_send`` or ``connector`` transport (anonymous or certificate-based SMTP: no app) and a
  delegated ``submission`` (a user's refresh token cannot carry an application permission) use the
  app named by ``[tracing] app``; without it, the app of the relay's other transports when they all
  belong to one tenant (the usual single-tenant relay); else they are not followed;
- a ``smarthost`` is not Microsoft 365: never followed.

An app whose token authority is not Microsoft's public cloud (a national cloud, the sandbox) needs its
``graph_url`` set too, or relay365 would ask the public Graph about another cloud's mail: such an app
is not used. The quota (100 requests per 5 minutes) belongs to the tenant, so transports of one tenant
share one app and one client: a graph transport's app if there is one, else the first app.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay365.settings import M365Options, Settings, TransportSettings

M365_TYPES = ("submission", "direct_send", "connector", "graph")
_DEFAULTS = M365Options()


def has_app(t: TransportSettings) -> bool:
    """Can this transport's credentials get an app-only Graph token?"""
    m = t.m365
    if t.type not in ("submission", "graph") or not (m.tenant and m.client_id):
        return False
    if t.type == "submission" and m.auth != "xoauth2":
        return False
    return bool(m.client_secret or m.certificate_file)


def graph_known(t: TransportSettings) -> bool:
    """Is ``graph_url`` the Graph of the cloud the token comes from (set, or both left public)?"""
    m = t.m365
    return m.graph_url != _DEFAULTS.graph_url or m.authority.rstrip("/") == _DEFAULTS.authority


@dataclass(frozen=True, slots=True)
class TraceApp:
    """One app registration reading one tenant's trace, with the credentials of transport ``name``."""

    name: str
    settings: TransportSettings

    @property
    def tenant(self) -> tuple[str, str]:
        m = self.settings.m365
        return (m.tenant or "").lower(), m.graph_url.rstrip("/").lower()


@dataclass(frozen=True, slots=True)
class FollowPlan:
    """``transports``: followed transport -> the name of the app that reads its trace;
    ``skipped``: transport -> why it is not followed (said once in the log)."""

    apps: dict[str, TraceApp] = field(default_factory=dict)
    transports: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def app_for(self, transport: str) -> TraceApp | None:
        name = self.transports.get(transport)
        return self.apps.get(name) if name is not None else None


def follow_plan(settings: Settings) -> FollowPlan:
    """The transports to follow and their apps, as ``[tracing]`` and the transports define them."""
    tracing = settings.tracing
    plan = FollowPlan()
    if not tracing.enabled:
        return plan
    named = set(tracing.transports)
    usable = [t for t in settings.transports if has_app(t) and graph_known(t)]
    usable.sort(key=lambda t: t.type != "graph")  # a graph transport's app first (stable otherwise)
    by_tenant: dict[str, TraceApp] = {}
    for t in usable:
        by_tenant.setdefault(TraceApp(t.name, t).tenant[0], TraceApp(t.name, t))
    default: TraceApp | None = None
    if tracing.app:
        chosen = settings.transport(tracing.app)
        default = by_tenant.get(TraceApp(chosen.name, chosen).tenant[0])
    elif len(by_tenant) == 1:
        default = next(iter(by_tenant.values()))
    for t in settings.transports:
        if named and t.name not in named:
            continue
        if t.type not in M365_TYPES:
            if named:
                plan.skipped[t.name] = "not a Microsoft 365 transport"
            continue
        if has_app(t) and not graph_known(t):
            plan.skipped[t.name] = (
                "its token authority is not Microsoft's public cloud: set graph_url to that cloud's Graph"
            )
            continue
        app = by_tenant[TraceApp(t.name, t).tenant[0]] if t in usable else default
        if app is None:
            plan.skipped[t.name] = (
                f"a {t.type} transport has no app registration of its own: name a submission or graph "
                "transport with app-only credentials in [tracing] app"
            )
            continue
        plan.apps[app.name] = app
        plan.transports[t.name] = app.name
    return plan
