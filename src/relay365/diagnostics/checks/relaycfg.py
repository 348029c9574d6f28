"""Checks of relay365 itself: the configuration, listener certificates, the spool and the queue.

Each function returns :class:`CheckResult` values; nothing here changes the relay's state (the spool is
opened read-only in spirit: ``list()`` only, and only when its database already exists).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from relay365.diagnostics.checks.result import CheckResult, failed, passed, warned
from relay365.errors import ConfigError, Relay365Error
from relay365.replies import summary
from relay365.settings import ListenerSettings, Settings, load_settings
from relay365.spool.factory import locate, open_spool, pg_target, spool_exists
from relay365.spool.model import QueueEntry, RcptState
from relay365.spool.pg_check import probe

CERT_WARN_DAYS = 30
SPOOL_WARN_BYTES = 1 << 30  # 1 GiB
SPOOL_FAIL_BYTES = 100 << 20  # 100 MiB


def check_config(path: Path) -> tuple[Settings | None, CheckResult]:
    """Load and validate ``path``: a ConfigError becomes one fail row naming the key and value."""
    name = f"Config {path}"
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        return None, failed(name, f"key '{exc.key}' = {exc.value!r}: {exc.problem}", _config_fix(exc))
    counts = (
        f"{len(settings.listeners)} listener(s), {len(settings.devices)} device(s), "
        f"{len(settings.transports)} transport(s), {len(settings.routes)} route(s)"
    )
    return settings, passed(name, f"valid: {counts}")


def _config_fix(exc: ConfigError) -> str:
    if exc.key == "config file":
        return "Check the path and that the file is valid TOML (line and column are in the detail)"
    return f"Correct '{exc.key}' in the config file (see the detail), then run doctor again"


def _days(delta: dt.timedelta) -> str:
    return f"{delta.total_seconds() / 86400:.0f} day(s)"


def check_listener_cert(listener: ListenerSettings, *, now: dt.datetime | None = None) -> CheckResult:
    """The listener's ``cert_file``: expired -> fail, expiring within 30 days -> warn."""
    name = f"Listener certificate {listener.name}"
    if listener.cert_file is None:
        if listener.tls == "none":
            return passed(name, "TLS off on this listener (no certificate needed)")
        return warned(
            name,
            "no cert_file: relay365 uses a self-signed certificate devices cannot verify",
            "Set cert_file/key_file to a certificate for the relay's name (from your CA)",
        )
    when = now or dt.datetime.now(dt.UTC)
    try:
        cert = x509.load_pem_x509_certificate(listener.cert_file.read_bytes())
    except (OSError, ValueError) as exc:
        detail = f"cannot read {listener.cert_file}: {exc}"
        return failed(name, detail, "Point cert_file at a PEM certificate")
    expires = cert.not_valid_after_utc
    subject = cert.subject.rfc4514_string()
    if expires <= when:
        return failed(
            name,
            f"{subject} expired on {expires:%Y-%m-%d %H:%M} UTC ({_days(when - expires)} ago)",
            f"Renew the certificate and replace {listener.cert_file} (devices refuse expired certificates)",
        )
    left = expires - when
    if left <= dt.timedelta(days=CERT_WARN_DAYS):
        return warned(
            name,
            f"{subject} expires on {expires:%Y-%m-%d} ({_days(left)} left)",
            f"Renew it within {_days(left)} and replace {listener.cert_file}",
        )
    return passed(name, f"{subject} valid until {expires:%Y-%m-%d} ({_days(left)} left)")


def _existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_spool_dir(
    directory: Path, *, warn_bytes: int = SPOOL_WARN_BYTES, fail_bytes: int = SPOOL_FAIL_BYTES
) -> list[CheckResult]:
    """Writable (a real temporary file is created and removed) and enough free space."""
    name = f"Spool directory {directory}"
    base = _existing(directory)
    if not base.is_dir():
        return [
            failed(
                name, f"{base} is not a directory", "Point server.spool_dir at a directory on a local disk"
            )
        ]
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".relay365-doctor-") as f:
            f.write(b"relay365 doctor")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return [
            failed(
                name,
                f"cannot write in {base}: {exc.strerror or exc}",
                "Give the relay365 service user write access (chown/chmod the spool directory)",
            )
        ]
    made = "" if base == directory else f" (does not exist yet; the relay creates it under {base})"
    results = [passed(name, f"writable{made}")]
    usage = shutil.disk_usage(base)
    free = f"{usage.free / (1 << 20):,.0f} MiB free of {usage.total / (1 << 30):,.1f} GiB"
    space = f"Spool free space {directory}"
    fix = "Free disk space or move server.spool_dir: when the disk fills, devices get 452 4.3.1"
    if usage.free < fail_bytes:
        results.append(failed(space, f"{free} (under {fail_bytes >> 20} MiB)", fix))
    elif usage.free < warn_bytes:
        results.append(warned(space, f"{free} (under {warn_bytes / (1 << 30):g} GiB)", fix))
    else:
        results.append(passed(space, free))
    return results


def _oldest_deferred(entries: Sequence[QueueEntry]) -> tuple[QueueEntry, str, str] | None:
    found = [
        (e.received_at, e, r.rcpt, r.last_reply)
        for e in entries
        for r in e.recipients
        if r.state is RcptState.DEFERRED
    ]
    if not found:
        return None
    _, entry, rcpt, reply = min(found, key=lambda x: (x[0], x[1].queue_id))
    return entry, rcpt, reply


async def check_postgres(settings: Settings) -> list[CheckResult]:
    """A PostgreSQL spool: the connection, the server's version and the schema's (nothing for SQLite)."""
    try:
        if locate(settings).scheme != "postgresql":
            return []
        target = pg_target(settings)
    except Relay365Error as exc:
        return [failed("PostgreSQL spool", str(exc), "Fix [spool] in the configuration")]
    name = f"PostgreSQL spool {target.shown()}"
    try:
        status = await probe(target)
    except Relay365Error as exc:
        fix = "Check the server, the URL, the password (password_env/_file, PGPASSWORD, .pgpass), pg_hba.conf"
        return [failed(name, str(exc), fix)]
    detail = (
        f"PostgreSQL {status.server}, schema version {status.schema_version}, round trip"
        f" {status.round_trip_ms:.1f} ms (relay365 commits with synchronous_commit = on; the"
        f" server's default is {status.server_synchronous_commit})"
    )
    problems = status.problems(target.shown())
    if problems:
        return [failed(name, "; ".join(problems), "Run 'relay365 spool migrate -c relay365.toml'")]
    return [passed(name, detail)]


async def check_queue(settings: Settings, *, now: float | None = None) -> list[CheckResult]:
    """Backlog (queue entries) and the oldest deferred recipient with its last reply explained."""
    try:
        where = locate(settings)
        place = where.path if where.path is not None else where.url
    except ConfigError:
        place = settings.server.spool_dir
    name = f"Queue backlog {place}"
    try:
        if not spool_exists(settings):
            return [passed(name, "no queue yet (the relay has not run with this spool)")]
        async with open_spool(settings) as spool:
            entries = await spool.list()
    except ConfigError as exc:
        return [failed(name, f"{exc.problem}", f"Fix '{exc.key}' in the configuration")]
    except Relay365Error as exc:
        return [failed(name, f"cannot read the queue: {exc}", "Check the spool's permissions and disk")]
    held = sum(1 for e in entries if e.held)
    results = [passed(name, f"{len(entries)} message(s) queued, {held} held")]
    oldest = _oldest_deferred(entries)
    if oldest is None:
        results.append(passed("Oldest deferred recipient", "none: nothing waits for a retry"))
        return results
    entry, rcpt, reply = oldest
    age = (now if now is not None else time.time()) - entry.received_at
    detail = f"{entry.queue_id} to <{rcpt}> waiting {age / 3600:.1f} h; last reply: {reply or '(none)'}"
    show = f"relay365 queue show {entry.queue_id}" + (
        f" --config {settings.source}" if settings.source else ""
    )
    fix = summary(reply) if reply else f"No reply recorded yet: see '{show}'"
    lifetime = settings.delivery.queue_lifetime
    status = failed if age > lifetime / 2 else warned
    if age > lifetime / 2:
        detail += f" (over half the {lifetime / 86400:g}-day queue lifetime: it will bounce)"
    results.append(status("Oldest deferred recipient", detail, fix))
    return results
