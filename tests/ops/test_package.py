"""The package as an admin gets it: ``python -m build`` makes the sdist and the wheel (the wheel from the
sdist, so the sdist is complete), the wheel installs into a fresh venv (dependencies from the package
index pip is configured with), and that installation alone runs ``relay365 --version``, ``config check``
on the shipped example, and the demo: a message through the relay into the shipped sandbox tenant.

One slow test (a build, a venv, a demo run), bounded by its own timeout."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

import relay365
from tests.core.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
SHIPPED = (
    "relay365/relay365.example.toml",
    "relay365/replies/catalogue.toml",
    "relay365/tracing/advice.toml",
    "relay365/sandbox/example_tenant.toml",
    "relay365/py.typed",
)


def run(
    *args: str | Path, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    clean |= {"COLUMNS": "200", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})}
    r = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=clean,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert r.returncode == 0, f"{args}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def build(tmp_path: Path) -> tuple[Path, Path]:
    """Build from a copy of what the sdist is made of, so the checkout is not touched."""
    src = tmp_path / "checkout"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(
        REPO / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "*.pyc")
    )
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--outdir", dist, src, cwd=tmp_path, timeout=600)
    [sdist] = dist.glob("relay365-*.tar.gz")
    [wheel] = dist.glob("relay365-*-py3-none-any.whl")
    return sdist, wheel


@pytest.mark.timeout(900)
def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path: Path) -> None:
    sdist, wheel = build(tmp_path)
    version = relay365.__version__
    assert wheel.name == f"relay365-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(f"relay365-{version}.dist-info/METADATA").decode()
        entry_points = z.read(f"relay365-{version}.dist-info/entry_points.txt").decode()
    assert set(SHIPPED) <= names
    assert "relay365 = relay365.cli:main" in entry_points
    assert "Requires-Dist: aiosmtpd==1.4.6" in metadata and f"Version: {version}" in metadata
    with tarfile.open(sdist) as t:
        in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {f"src/{x}" for x in SHIPPED} <= in_sdist

    venv = tmp_path / "venv"
    # A bare venv, filled by this pip (--python): the same install, without bootstrapping a second pip.
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    run(sys.executable, "-m", "pip", "--python", venv / "bin/python", "install", "-q", wheel, cwd=tmp_path,
        timeout=600)  # fmt: skip
    cli = venv / "bin/relay365"
    where = run(venv / "bin/python", "-c", "import relay365; print(relay365.__file__)", cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # not the checkout

    assert run(cli, "--version", cwd=tmp_path).stdout.strip() == f"relay365 {version}"
    shipped = run(
        venv / "bin/python", "-c",
        "from relay365.setup.example import example_config; print(example_config())",
        cwd=tmp_path,
    ).stdout.strip()  # fmt: skip
    assert Path(shipped).is_relative_to(venv)
    # The admin's first step: the example copied out, its secrets set, then checked (where config check
    # runs serve's preflight it needs every *_env set and token cache folders present).
    copy = tmp_path / "relay365.toml"
    run(cli, "config", "example", "--output", copy, cwd=tmp_path)
    assert copy.read_text() == Path(shipped).read_text()
    (tmp_path / "var").mkdir()
    secrets = {name: "Example-s3cret-0001" for name in re.findall(r'_env\s*=\s*"(\w+)"', copy.read_text())}
    checked = run(cli, "config", "check", copy, cwd=tmp_path, env=secrets)
    assert checked.stdout.startswith("ok "), checked.stdout

    demo_message(cli, tmp_path / "demo")


def demo_message(cli: Path, cwd: Path) -> None:
    """``relay365 serve`` with no config (the demo, on the shipped sandbox tenant), ``relay365 send``
    through it, and the message in the sandbox mailbox."""
    cwd.mkdir()
    port = free_port()
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [cli, "serve", "--demo-dir", "state", "--demo-port", str(port)],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    output = ""
    try:
        deadline = time.monotonic() + 120
        while "Then:" not in output:
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, f"demo did not start:\n{output}"
            output += line
        sent = run(cli, "send", "--server", f"127.0.0.1:{port}", "--from", "scanner@contoso.test",
                   "--to", "alice@contoso.test", "--insecure", cwd=cwd)  # fmt: skip
        assert sent.stdout.startswith("accepted: 2.0.0 Ok: queued as "), sent.stdout
        deadline = time.monotonic() + 60
        while True:
            listed = run(
                cli, "sandbox", "mail", "list", "--state-dir", cwd / "state/sandbox", "--json", cwd=cwd
            )
            found = [m for m in json.loads(listed.stdout) if m["mailbox"] == "alice@contoso.test"]
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert [(m["folder"], m["endpoint"]) for m in found] == [("Inbox", "mx")], listed.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output + rest
