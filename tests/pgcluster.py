"""A private PostgreSQL cluster for tests: initdb in a temporary directory, loopback only, a free port,
run as an unprivileged user when the tests run as root, stopped by PID, its directory removed after.

Debian's ``postgresql`` package puts the server binaries in /usr/lib/postgresql/<version>/bin, which is
not on PATH; the newest version there is used (``./scripts/test`` installs the package when missing).
A cluster that cannot start raises: tests that need PostgreSQL fail, they never skip.

Fixtures (imported by tests/conftest.py): ``pg_cluster`` (one per test session), and ``pg`` (a fresh
database per test, made from a template that already holds relay365's schema, dropped after).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

TEMPLATE = "relay365_template"


def server_bindir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=_version_key, reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    raise RuntimeError("PostgreSQL server binaries not found: install Debian's 'postgresql' package")


def _version_key(path: str) -> int:
    part = Path(path).parent.parent.name
    return int(part) if part.isdigit() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresCluster:
    """One ``postgres`` server of our own. ``stop``/``start`` again keep the port (an outage test)."""

    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="relay365-pg-")))
    user: str = "relay365"
    password: str = field(default_factory=lambda: "pg-" + secrets.token_hex(12))
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    _initialised: bool = False

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def log_path(self) -> Path:
        return self.base / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        """A URL without the password: it comes from PGPASSWORD, ``password_env`` or a password file."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url(database), password=self.password, autocommit=True, **kwargs)

    def _owner(self) -> dict[str, int]:
        if os.geteuid() != 0:
            return {}
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                pw = pwd.getpwnam(name)
                return {"user": pw.pw_uid, "group": pw.pw_gid}
        raise RuntimeError("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL")

    def _initdb(self, bindir: Path, owner: dict[str, int]) -> None:
        # The server user must reach the directory: pytest's tmp_path is under a 0700 root directory,
        # so the cluster lives in its own directory directly under the system temp dir.
        self.data_dir.mkdir(mode=0o700)
        (self.base / "sock").mkdir()
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if owner:
            for p in (self.base, self.data_dir, self.base / "sock", pwfile):
                os.chown(p, owner["user"], owner["group"])
            os.chmod(self.base, 0o700)
        try:
            init = subprocess.run(
                [str(bindir / "initdb"), "-D", str(self.data_dir), "-U", self.user, "--pwfile", str(pwfile),
                 "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale",
                 "--no-sync"],
                capture_output=True, text=True, timeout=120, check=False, **owner,  # type: ignore[call-overload]
            )  # fmt: skip
        finally:
            pwfile.unlink()
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}): {init.stdout}{init.stderr}")
        self._initialised = True

    def start(self, timeout: float = 60.0) -> PostgresCluster:
        bindir = server_bindir()
        owner = self._owner()
        if not self._initialised:
            self._initdb(bindir, owner)
        last_error = ""
        for _ in range(5):
            self.port = self.port or _free_port()
            log = self.log_path.open("ab")
            try:
                self.proc = subprocess.Popen(
                    [str(bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                     "-c", "listen_addresses=127.0.0.1",
                     "-c", f"unix_socket_directories={self.base / 'sock'}",
                     "-c", "fsync=on", "-c", "synchronous_commit=on", "-c", "max_connections=300",
                     "-c", "shared_buffers=64MB", "-c", "log_min_messages=warning"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, **owner,  # type: ignore[call-overload]
                )  # fmt: skip
            finally:
                log.close()
            if self._wait_ready(timeout):
                return self
            last_error = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
            self.port = 0  # taken by someone else in the meantime: another one
        raise RuntimeError(f"PostgreSQL did not start:\n{last_error}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with self.connect(connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        return False

    def stop(self, *, immediate: bool = False) -> None:
        """Stop the server by its PID: fast shutdown (SIGINT), or a crash-like one (SIGQUIT)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT if immediate else signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    # -- databases ---------------------------------------------------------------------------------
    def create_database(self, name: str, *, template: str | None = None) -> str:
        with self.connect() as conn:
            tail = f" TEMPLATE {template}" if template else ""
            conn.execute(f"CREATE DATABASE {name}{tail}")  # type: ignore[arg-type]
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # type: ignore[arg-type]


@dataclass(frozen=True)
class PgDatabase:
    """One test's database: its URL (no password in it) and the password to use."""

    cluster: PostgresCluster
    name: str

    @property
    def url(self) -> str:
        return self.cluster.url(self.name)

    @property
    def password(self) -> str:
        return self.cluster.password

    def connect(self) -> psycopg.Connection[Any]:
        return self.cluster.connect(self.name)


def _migrated_template(cluster: PostgresCluster) -> None:
    from relay365.spool.pg_schema import migrate_url

    url = cluster.create_database(TEMPLATE)
    migrate_url(url, password=cluster.password)
    with cluster.connect() as conn:
        conn.execute(f"ALTER DATABASE {TEMPLATE} WITH IS_TEMPLATE true")  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.start()
        _migrated_template(cluster)
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg(pg_cluster: PostgresCluster) -> Iterator[PgDatabase]:
    """A fresh database with relay365's schema, dropped after the test."""
    name = f"t_{secrets.token_hex(6)}"
    pg_cluster.create_database(name, template=TEMPLATE)
    try:
        yield PgDatabase(pg_cluster, name)
    finally:
        pg_cluster.drop_database(name)
