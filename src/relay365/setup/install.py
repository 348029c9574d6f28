"""``relay365 service install``: the unit, the service user, the config's permissions; then the admin
runs ``systemctl enable --now relay365``.

``root`` is the file system to install into (``/``, or an image being built, like ``systemctl --root``
and ``systemd-sysusers --root``); every path the unit names stays the path on the target system.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from relay365.errors import ConfigError, InstallError
from relay365.settings import load_settings
from relay365.setup.files import write_file
from relay365.setup.unit import (
    ENV_FILE,
    SYSUSERS_FILE,
    UNIT_FILE,
    UnitOptions,
    hidden_by_sandbox,
    render_sysusers,
    render_unit,
    sandbox_problems,
)


@dataclass
class InstallReport:
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _inside(root: Path, path: Path) -> Path:
    return root / path.relative_to("/")


def interpreter_of(exe: Path) -> Path | None:
    """The interpreter a script names on its ``#!`` line (a venv's python, itself often a symlink)."""
    try:
        with exe.open("rb") as f:
            head = f.readline(512)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].decode("utf-8", "replace").split()
    return Path(words[0]) if words else None


def check_exec(options: UnitOptions) -> None:
    """The command and the interpreter it runs must be visible inside the sandbox."""
    exe = Path(options.exec_start[0])
    if not exe.is_absolute():
        raise InstallError(f"--exec {exe}: give the absolute path of the relay365 command")
    for path in (exe, interpreter_of(exe)):
        if path is not None and (prefix := hidden_by_sandbox(path)) is not None:
            raise InstallError(
                f"relay365 runs from {path.resolve()}, under {prefix}, which the service cannot see"
                " (ProtectHome=, PrivateTmp=). Install it system-wide, e.g. as root: PIPX_HOME=/opt/pipx"
                " PIPX_BIN_DIR=/usr/local/bin pipx install --python /usr/bin/python3 relay365"
            )
        if path is exe and not exe.is_file():
            raise InstallError(f"--exec {exe}: no such file")


def check_config(options: UnitOptions, root: Path, report: InstallReport) -> Path | None:
    """Load the config the unit will run with and refuse what the sandbox would break."""
    if not options.config.is_absolute():
        raise InstallError(f"--config {options.config}: give an absolute path")
    if (prefix := hidden_by_sandbox(options.config)) is not None:
        raise InstallError(f"--config {options.config}: the service cannot see {prefix}; use /etc/relay365/")
    path = _inside(root, options.config)
    if not path.exists():
        report.notes.append(
            f"No config at {options.config} yet: write one with"
            f" `relay365 init --output {options.config}` before starting the service."
        )
        return None
    try:
        settings = load_settings(path)
    except ConfigError as e:
        raise InstallError(f"{options.config}: {e}") from None
    problems = sandbox_problems(settings)
    if problems:
        raise InstallError(
            f"{options.config} would not work inside the service's sandbox:\n- " + "\n- ".join(problems)
        )
    return path


def create_user(options: UnitOptions, root: Path) -> None:
    """systemd-sysusers applies the sysusers.d entry (idempotent: an existing user is kept)."""
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        raise InstallError(
            "systemd-sysusers not found; create the user yourself: useradd --system --user-group"
            f" --home-dir /var/lib/relay365 --shell /usr/sbin/nologin {options.user}"
        )
    args = [tool, *(["--root", str(root)] if root != Path("/") else []), SYSUSERS_FILE.name]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    if r.returncode != 0:
        raise InstallError(f"systemd-sysusers failed ({r.returncode}): {r.stderr.strip()}")


def _group_id(root: Path, group: str) -> int:
    try:
        for line in _inside(root, Path("/etc/group")).read_text(encoding="utf-8").splitlines():
            fields = line.split(":")
            if len(fields) >= 3 and fields[0] == group and fields[2].isdigit():
                return int(fields[2])
    except OSError:
        pass
    raise InstallError(f"group {group} not found in {root / 'etc/group'}")


def share_config(config: Path, options: UnitOptions, root: Path, report: InstallReport) -> None:
    """root:relay365 0640: the service reads its config (device password hashes), others do not."""
    if os.geteuid() != 0:
        report.notes.append(f"Not root: make {config} readable by {options.user} (chgrp, chmod 0640).")
        return
    os.chown(config, 0, _group_id(root, options.user))
    os.chmod(config, 0o640)


def install(options: UnitOptions, *, root: Path = Path("/"), force: bool = False) -> InstallReport:
    if root == Path("/") and os.geteuid() != 0:
        raise InstallError("run it as root (sudo relay365 service install), or add --print to see the unit")
    report = InstallReport()
    check_exec(options)
    config = check_config(options, root, report)
    for target, text in ((UNIT_FILE, render_unit(options)), (SYSUSERS_FILE, render_sysusers(options.user))):
        path = _inside(root, target)
        changed = write_file(path, text, mode=0o644, force=force)
        (report.written if changed else report.unchanged).append(path)
    create_user(options, root)
    if config is not None:
        share_config(config, options, root, report)
    report.notes.append(
        f"Secrets named by *_env keys go into {ENV_FILE} (NAME=value lines, chmod 600);"
        f" secrets in *_file files: chown {options.user}, chmod 600."
    )
    return report
