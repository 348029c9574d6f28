"""The package map is enforced (issue 9 item 4): import-linter's contracts in pyproject.toml, run by
./scripts/test as ``lint-imports``, hold for the package, and they do catch what they are meant to:
a relay layer importing a tool, an upward import, an import cycle, also when the import is
function-local or only for type checking."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import relay365

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(relay365.__file__).parent
LINT = Path(sys.executable).parent / "lint-imports"


def lint(cwd: Path, src: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports with the project's contracts on the package in ``src``."""
    shutil.copy(ROOT / "pyproject.toml", cwd / "pyproject.toml")
    return subprocess.run(
        [str(LINT), "--no-cache"],
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def copy_of_package(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "relay365", ignore=shutil.ignore_patterns("__pycache__"))
    return src


def append(src: Path, module: str, text: str) -> None:
    path = src / "relay365" / module
    path.write_text(path.read_text() + "\n\n" + text + "\n")


def test_the_package_keeps_its_contracts(tmp_path: Path) -> None:
    result = lint(tmp_path, copy_of_package(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def test_a_function_local_import_of_a_tool_is_caught(tmp_path: Path) -> None:
    """What the lazy ``diagnostics.catalogue`` import in ``transports/replies.py`` once was."""
    src = copy_of_package(tmp_path)
    append(
        src,
        "delivery/router.py",
        "def _hint() -> object:\n    from relay365.diagnostics import explain\n\n    return explain",
    )
    result = lint(tmp_path, src)
    assert result.returncode == 1
    assert (
        "No relay layer imports the tools (only cli, service and setup may start them) BROKEN"
        in result.stdout
    )
    assert "relay365.delivery.router -> relay365.diagnostics" in result.stdout
    assert "The package map: each layer imports only the layers below it BROKEN" in result.stdout


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    """The console reading the composition root (the cycle issue 9 found behind TYPE_CHECKING)."""
    src = copy_of_package(tmp_path)
    append(
        src,
        "admin/api.py",
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from relay365.service.relay import Relay",
    )
    result = lint(tmp_path, src)
    assert result.returncode == 1
    assert "The package map: each layer imports only the layers below it BROKEN" in result.stdout
    assert "relay365.admin is not allowed to import relay365.service" in result.stdout


def test_an_import_cycle_inside_a_package_is_caught(tmp_path: Path) -> None:
    src = copy_of_package(tmp_path)
    append(
        src,
        "spool/model.py",
        "def _backend() -> object:\n    from relay365.spool import sqlite\n\n    return sqlite",
    )
    result = lint(tmp_path, src)
    assert result.returncode == 1
    assert "No import cycles between the modules of any package BROKEN" in result.stdout
    assert "No cycles are allowed in relay365.spool." in result.stdout


def test_a_new_top_level_package_must_be_placed_in_the_map(tmp_path: Path) -> None:
    src = copy_of_package(tmp_path)
    (src / "relay365" / "workers.py").write_text('"""Not in the package map yet."""\n')
    result = lint(tmp_path, src)
    assert result.returncode == 1
    assert "relay365.workers" in result.stdout
