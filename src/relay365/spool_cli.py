"""``relay365 spool``: create or upgrade the PostgreSQL spool's schema, and move a queue into it.

- ``relay365 spool migrate -c relay365.toml`` (or ``--url``): creates the schema in an empty database or
  upgrades an older one; nodes refuse to start until it has run (pg_schema.py).
- ``relay365 spool copy --from sqlite:PATH --to postgresql://...``: copies every message (body,
  recipients' states, holds) and the pacing windows, then reads everything back and compares
  (spool/pg_copy.py). Run again after an interruption: what is there already is skipped.

The password comes from the config's ``[spool] password_env``/``password_file`` (with ``-c``) or
libpq's ``PGPASSWORD``/``~/.pgpass``; never from the command line.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from relay365.errors import ConfigError, Relay365Error
from relay365.settings import check_postgres_url, load_settings, redact_url

spool_app = typer.Typer(
    help="Create or upgrade the PostgreSQL spool; move a queue into it.", no_args_is_help=True
)
out = Console()
err = Console(stderr=True)

if TYPE_CHECKING:
    from relay365.spool.pg_connect import PgTarget


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(2)


def _target(url: str | None, config: Path | None) -> PgTarget:
    """The PostgreSQL spool from ``--url`` or the config; the config's password setting if given."""
    from relay365.credentials import load_secret
    from relay365.spool.pg_connect import PgTarget

    password = None
    try:
        if config is not None:
            settings = load_settings(config)
            if settings.spool.password is not None:
                password = load_secret(settings.spool.password)
            if url is None:
                url = settings.spool.url
        if url is None:
            raise _fail("give --url postgresql://user@host:port/db or -c relay365.toml")
        check_postgres_url(url, key="--url" if config is None else "spool.url")
    except Relay365Error as e:
        raise _fail(str(e)) from None
    return PgTarget(url=url, password=password)


UrlOpt = Annotated[str | None, typer.Option("--url", help="postgresql://user@host:port/db (no password)")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="relay365.toml with [spool] url")]


@spool_app.command("migrate")
def migrate(url: UrlOpt = None, config: ConfigOpt = None) -> None:
    """Create the PostgreSQL spool's schema, or upgrade it to this relay365's version."""
    import psycopg

    from relay365.spool.pg_schema import migrate_url

    target = _target(url, config)
    try:
        before, after = migrate_url(target.url, password=target.password)
    except (psycopg.Error, Relay365Error) as e:
        raise _fail(f"{redact_url(target.url)}: {' '.join(str(e).split())}") from None
    where = redact_url(target.url)
    if before is None:
        out.print(f"[green]created[/green] the spool schema (version {after}) in {where}", highlight=False)
    elif before == after:
        out.print(f"the spool schema in {where} is up to date (version {after})", highlight=False)
    else:
        out.print(
            f"[green]upgraded[/green] the spool schema in {where}: {before} -> {after}", highlight=False
        )


@spool_app.command("copy")
def copy(
    source: Annotated[str, typer.Option("--from", help="sqlite:PATH (the old spool directory)")],
    to: Annotated[str | None, typer.Option("--to", help="postgresql://user@host:port/db")] = None,
    config: ConfigOpt = None,
) -> None:
    """Copy a SQLite spool's queue (messages, recipients' states, pacing windows) into PostgreSQL.
    Stop relay365 on the SQLite spool first; migrate the database first."""
    from relay365.spool.pg_copy import copy_sqlite_to_pg
    from relay365.spool.postgres import PgSpool
    from relay365.spool.sqlite import SqliteSpool

    if not source.startswith("sqlite:") or not source.removeprefix("sqlite:").strip():
        raise _fail(f"--from {source!r}: give sqlite:PATH, the old spool directory")
    directory = Path(source.removeprefix("sqlite:").removeprefix("//")).expanduser()
    if not (directory / "queue.db").is_file():
        raise _fail(f"no SQLite spool at {directory} (no queue.db)")
    target = _target(to, config)

    async def run() -> None:
        old = SqliteSpool(directory)
        new = PgSpool(target)
        await old.open()
        try:
            await new.open()
            try:
                report = await copy_sqlite_to_pg(old, new)
            finally:
                await new.close()
        finally:
            await old.close()
        out.print(
            f"[green]copied[/green] {report.copied} message(s) ({report.bytes} bytes) and"
            f" {report.pace_events} pacing event(s) to {target.shown()}; {report.skipped} were there"
            f" already. Every message was read back and compared. Point [spool] url at the database and"
            f" start relay365; keep {directory} until mail flows.",
            highlight=False,
        )

    try:
        asyncio.run(run())
    except (Relay365Error, ConfigError) as e:
        raise _fail(str(e)) from None


def register(app: typer.Typer) -> None:
    app.add_typer(spool_app, name="spool")


__all__ = ["register"]
