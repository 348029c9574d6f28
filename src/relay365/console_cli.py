"""``relay365 admin ...`` (console accounts and API tokens) and ``relay365 trace`` (the tracking log
from the command line, as the console's Message trace page searches it: the relay's events and
Microsoft 365's, from its message trace, in one timeline)."""

from __future__ import annotations

import asyncio
import csv
import getpass
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from relay365.errors import ConfigError, Relay365Error
from relay365.settings import Settings, load_settings

admin_app = typer.Typer(help="Console accounts (Argon2id) and API tokens.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens for automation (stored hashed).", no_args_is_help=True)
admin_app.add_typer(token_app, name="token")
out = Console()
err = Console(stderr=True)
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="relay365.toml")]
DEFAULT_CONFIG = Path("relay365.toml")

if TYPE_CHECKING:
    from relay365.admin.accounts import AccountStore, Role
    from relay365.observability.tracking import TraceQuery, TrackingEvent
    from relay365.observability.tracking_pg import PgTrackingLog
    from relay365.observability.tracking_sqlite import SqliteTrackingLog


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(2)


def _settings(config: Path) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as e:
        raise _fail(str(e)) from None


def _store(config: Path) -> AccountStore:
    from relay365.admin.accounts import AccountStore

    s = _settings(config)
    return AccountStore(s.admin.users_file or s.server.spool_dir / "admin-users.json")


def _role(value: str) -> Role:
    from relay365.admin.accounts import Role

    if value not in set(Role):
        raise _fail(f"role must be viewer or operator, not {value!r}")
    return Role(value)


@admin_app.command("passwd")
def admin_passwd(
    name: Annotated[str, typer.Argument(help="account name")],
    role: Annotated[str, typer.Option(help="viewer (read only) or operator (acts on mail)")] = "operator",
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="read it from stdin")] = False,
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """Create a console account or set its password and role (Argon2id hash in the accounts file)."""
    from relay365.admin.accounts import AccountError

    store = _store(config)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {name}: ")
        if getpass.getpass("Again: ") != password:
            raise _fail("the passwords differ")
    if len(password) < 8:
        raise _fail("use a password of at least 8 characters")
    try:
        store.set_password(name, password, _role(role))
    except (AccountError, Relay365Error, OSError) as e:
        raise _fail(str(e)) from None
    out.print(f"account {escape(name)} ({role}) saved in {store.path}", highlight=False)


@admin_app.command("remove")
def admin_remove(name: str, config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Remove a console account (its sessions end at their next request)."""
    from relay365.admin.accounts import AccountError

    try:
        _store(config).remove(name)
    except AccountError as e:
        raise _fail(str(e)) from None
    out.print(f"account {escape(name)} removed", highlight=False)


@admin_app.command("list")
def admin_list(config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Console accounts and API tokens (never their secrets)."""
    from relay365.admin.accounts import AccountError
    from relay365.admin.views import when

    store = _store(config)
    try:
        users, tokens = store.users(), store.tokens()
    except AccountError as e:
        raise _fail(str(e)) from None
    table = Table(title=f"console accounts in {store.path}")
    for col in ("name", "role", "kind"):
        table.add_column(col)
    for name, role in users.items():
        table.add_row(name, role.value, "account")
    for token_id, t in tokens.items():
        table.add_row(
            f"{t.get('name')} ({token_id})", str(t.get("role")), f"API token, made {when(t.get('created'))}"
        )
    out.print(table)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="what the token is for, e.g. grafana")],
    role: Annotated[str, typer.Option(help="viewer or operator")] = "viewer",
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """Make an API token; it is shown once (send it as 'Authorization: Bearer TOKEN')."""
    from relay365.admin.accounts import AccountError

    try:
        token = _store(config).create_token(name, _role(role))
    except (AccountError, OSError) as e:
        raise _fail(str(e)) from None
    typer.echo(token)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="the 8 hex digits after r365_")],
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """Revoke an API token at once."""
    from relay365.admin.accounts import AccountError

    try:
        _store(config).revoke_token(token_id)
    except AccountError as e:
        raise _fail(str(e)) from None
    out.print(f"token {escape(token_id)} revoked", highlight=False)


def _open_log(s: Settings) -> SqliteTrackingLog | PgTrackingLog:
    """The tracking log where the spool keeps it (beside a SQLite queue, or in the PostgreSQL spool's
    database); refused when it is switched off or the relay has not written one yet."""
    from relay365.observability.tracking_pg import PgTrackingLog
    from relay365.observability.tracking_sqlite import SqliteTrackingLog
    from relay365.service.sharing import tracking_log
    from relay365.spool.factory import make_spool

    path = s.tracking.path or s.server.spool_dir / "tracking.db"
    try:
        log = tracking_log(s, make_spool(s))
    except Relay365Error as problem:
        raise _fail(str(problem)) from None
    if not isinstance(log, SqliteTrackingLog | PgTrackingLog):
        raise _fail("the tracking log is switched off ([tracking] enabled = false)")
    if isinstance(log, SqliteTrackingLog) and not path.exists():
        raise _fail(f"no tracking log at {path} (has the server run yet, with [tracking] enabled?)")
    return log


def trace(
    sender: Annotated[str | None, typer.Option(help="address, @domain or pattern with *")] = None,
    recipient: Annotated[str | None, typer.Option(help="address, @domain or pattern with *")] = None,
    subject: Annotated[str | None, typer.Option(help="substring of the Subject")] = None,
    message_id: Annotated[str | None, typer.Option("--message-id", help="Message-ID")] = None,
    queue_id: Annotated[str | None, typer.Option("--queue-id", help="queue id")] = None,
    device: Annotated[str | None, typer.Option(help="device name")] = None,
    kind: Annotated[
        str | None, typer.Option(help="event kinds, comma-separated (e.g. deferred,bounced)")
    ] = None,
    since: Annotated[str | None, typer.Option(help="ISO time (UTC) or Unix seconds")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time (UTC) or Unix seconds")] = None,
    limit: Annotated[int, typer.Option(help="newest N events (at most 100000)")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV with a header row")] = False,
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """Search the tracking log: what happened to a message, on the relay and inside Microsoft 365
    (Exchange Online's status, its reason and what to do), newest first (works while serving)."""
    from relay365.admin.views import BadRequest, trace_query, when
    from relay365.tracing.explain import event_dict, side, timeline

    s = _settings(config)
    log = _open_log(s)
    raw = {"sender": sender, "recipient": recipient, "subject": subject, "message_id": message_id,
           "queue_id": queue_id, "device": device, "kind": kind, "since": since, "until": until,
           "limit": str(limit)}  # fmt: skip
    try:
        query = trace_query({k: v for k, v in raw.items() if v is not None}, limit_max=100_000)
    except BadRequest as bad:
        raise _fail(str(bad)) from None
    # One timeline: Microsoft's events carry Microsoft's times and are written after the relay's.
    events = timeline(asyncio.run(_search(log, query)), newest_first=True)
    if as_json:
        for e in events:
            typer.echo(json.dumps(event_dict(e), ensure_ascii=False))
    elif as_csv:
        writer = csv.writer(sys.stdout)
        cols = list(event_dict(events[0])) if events else ["id", "at", "kind"]
        writer.writerow(cols)
        for e in events:
            row = event_dict(e)
            writer.writerow([row[c] if row[c] is not None else "" for c in cols])
    else:
        table = Table(title=f"{len(events)} event(s), newest first")
        for col in ("time (UTC)", "where", "event", "queue id", "from", "to", "subject", "device", "via",
                    "reply / status"):  # fmt: skip
            table.add_column(col, overflow="fold")
        for e in events:
            who = f" by {e.actor}" if e.actor else ""
            table.add_row(when(e.at), "Microsoft 365" if side(e) == "microsoft" else "relay",
                          e.kind.value + who, e.queue_id, e.sender, e.recipient, e.subject,
                          e.device or e.peer, e.transport, escape(_outcome(e)))  # fmt: skip
        out.print(table)


def _outcome(e: TrackingEvent) -> str:
    """The reply (or Microsoft's status) with its detail, and relay365's advice for Microsoft's status."""
    from relay365.tracing.explain import event_advice, side

    if side(e) == "relay":
        return e.reply or e.detail
    text = f"{e.reply}: {e.detail}" if e.detail else e.reply
    advice = event_advice(e)
    return f"{text}\nWhat to do: {advice.text}" if advice else text


def microsoft_side(settings: Settings, queue_id: str) -> list[dict[str, object]]:
    """Per recipient of one message: Microsoft 365's status, reason, advice and events, as the tracking
    log has them (``relay365 queue show``); empty without a tracking log."""
    from relay365.observability.tracking import M365_KINDS, TraceQuery
    from relay365.observability.tracking_pg import PgTrackingLog
    from relay365.observability.tracking_sqlite import SqliteTrackingLog
    from relay365.service.sharing import tracking_log
    from relay365.spool.factory import make_spool
    from relay365.tracing.explain import microsoft_half

    path = settings.tracking.path or settings.server.spool_dir / "tracking.db"
    if not settings.tracking.enabled:
        return []
    log = tracking_log(settings, make_spool(settings))
    if not isinstance(log, SqliteTrackingLog | PgTrackingLog):
        return []
    if isinstance(log, SqliteTrackingLog) and not path.exists():
        return []
    query = TraceQuery(queue_id=queue_id.strip().upper(), kinds=tuple(M365_KINDS), limit=1000)
    return microsoft_half(asyncio.run(_search(log, query)))


async def _search(log: SqliteTrackingLog | PgTrackingLog, query: TraceQuery) -> list[TrackingEvent]:

    await log.open(purge_every=None)
    try:
        events: list[TrackingEvent] = []
        q = replace(query, limit=min(query.limit, 1000))
        while len(events) < query.limit:
            page = await log.search(q)
            events += page.events
            if page.next_cursor is None:
                break
            q = replace(q, before=page.next_cursor, limit=min(1000, query.limit - len(events)))
        return events
    finally:
        await log.close()


def register(app: typer.Typer) -> None:
    app.add_typer(admin_app, name="admin")
    app.command("trace")(trace)
