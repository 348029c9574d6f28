"""``relay365 service install``: run relay365 as a systemd service (the composition root registers it)."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from relay365.errors import InstallError
from relay365.setup.install import install
from relay365.setup.unit import DEFAULT_CONFIG, SERVICE, UnitOptions, default_exec, render_unit

service_app = typer.Typer(help="Run relay365 as a systemd service.", no_args_is_help=True)
err = Console(stderr=True)


@service_app.command("install")
def install_command(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="the config the service runs with")
    ] = DEFAULT_CONFIG,
    user: Annotated[str, typer.Option(help="the system user the service runs as")] = SERVICE,
    exec_path: Annotated[
        str | None,
        typer.Option(
            "--exec", help="the relay365 command, e.g. '/usr/bin/python3 -m relay365' (default: this one)"
        ),
    ] = None,
    print_only: Annotated[bool, typer.Option("--print", help="print the unit; write nothing")] = False,
    root: Annotated[
        Path, typer.Option(help="install into this file system tree (an image) instead of /")
    ] = Path("/"),
    force: Annotated[bool, typer.Option(help="replace a unit that differs (e.g. edited by hand)")] = False,
) -> None:
    """Write /etc/systemd/system/relay365.service (hardened: own user, read-only system, only
    CAP_NET_BIND_SERVICE, notify + watchdog) and create the relay365 user; then enable it with
    systemctl. The config is checked against the sandbox first."""
    if exec_path is None:
        exec_start = default_exec()
    else:
        words = shlex.split(exec_path)
        if not words:
            raise typer.BadParameter("--exec: empty")
        found = shutil.which(words[0]) if "/" not in words[0] else words[0]
        exec_start = (str(Path(found).absolute()) if found else words[0], *words[1:])
    options = UnitOptions(exec_start=exec_start, config=config, user=user)
    if print_only:
        typer.echo(render_unit(options), nl=False)
        return
    try:
        report = install(options, root=root.absolute(), force=force)
    except InstallError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    for path in report.written:
        err.print(f"wrote {path}", highlight=False)
    for path in report.unchanged:
        err.print(f"unchanged {path}", highlight=False)
    for note in report.notes:
        err.print(note, highlight=False)
    if root != Path("/"):  # an image: enabled offline, started when it boots
        err.print(f"Next: systemctl --root={root} enable {SERVICE}", highlight=False)
        return
    err.print(
        "Next:\n"
        f"  relay365 config check {config}\n"
        f"  systemctl daemon-reload && systemctl enable --now {SERVICE}\n"
        f"  systemctl status {SERVICE}        journalctl -u {SERVICE} -f",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.add_typer(service_app, name="service")
