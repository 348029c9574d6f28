"""Preflight: everything ``relay365 serve`` needs before it binds a port, checked in one place.

``relay365 config check`` and ``serve`` run this same function (``preflight_for`` below), so
the check passes exactly when serve would start, given the same user and environment. It reports every
problem at once (:class:`relay365.errors.PreflightError`, one line each, naming the config key and the
file), and changes nothing on disk: no spool directory, no self-signed certificate is made here.

Checked, in config order:

* secrets: every ``*_env`` is set, every ``*_file`` is readable, not empty and mode 0600
  (``credentials.load_secret``, the function the transports use);
* token caches of delegated sign-ins hold a refresh token: mode 0600 like a secret file, valid JSON,
  their folder exists; a delegated transport without one is refused;
* certificates: listener ``cert_file``/``key_file``, transport ``client_cert_file``/``client_key_file``
  and the OAuth ``certificate_file`` parse, and each key belongs to its certificate; each listener's TLS
  context is then built by ``ingress.tls.server_context``, as serve builds it;
* CA files (``client_ca_file``, ``ca_file``, ``authority_ca_file``) hold at least one certificate;
* no two listeners (or a listener and the admin endpoint) bind the same port on overlapping addresses
  (``0.0.0.0`` covers every IPv4 address; ``::`` every IPv6 one, asyncio binds IPv6 with V6ONLY);
* the spool directory exists and is writable, or can be created; ``[spool] url`` names a backend this
  build has (spool/factory.py), and a ``sqlite:`` spool elsewhere is checked like the directory;
  a ``postgresql://`` spool: its password can be read, the server answers, is PostgreSQL 12 or newer
  and holds the schema this build works with (else: run ``relay365 spool migrate``);
* the queue (``queue.db``) and the tracking log (``tracking.db``), when they exist, were not written by
  a newer relay365 (their schema version, read-only: ``spool/schema_version.py``);
* every transport is built as serve builds it (its own checks run), and handed to serve.

Warnings (serve starts anyway; both print them): a world-readable private key, an expired listener
certificate, a legacy listener whose certificate is not RSA, a delegated sign-in not done yet.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import sqlite3
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from relay365.certfiles import Findings, check_ca, check_pair, is_rsa
from relay365.credentials import load_secret
from relay365.errors import ConfigError, PreflightError, Relay365Error
from relay365.ingress.tls import self_signed_paths, self_signed_types, server_context
from relay365.observability import tracking_schema
from relay365.settings import ListenerSettings, Settings, TransportSettings
from relay365.spool import sqlite_schema
from relay365.spool.factory import locate, pg_target
from relay365.spool.schema_version import Schema, check_version
from relay365.transports.base import Transport
from relay365.transports.registry import build_transport

BuildTransport = Callable[[TransportSettings], Transport]


@dataclass
class PreflightReport:
    """What serve starts with: the transports already built, and the warnings to show."""

    warnings: list[str] = field(default_factory=list)
    transports: dict[str, Transport] = field(default_factory=dict)

    async def close(self) -> None:
        for t in self.transports.values():
            await t.close()
        self.transports.clear()


async def preflight(
    settings: Settings, *, build_transport: BuildTransport, environ: Mapping[str, str] | None = None
) -> PreflightReport:
    out = Findings(problems=[], warnings=[])
    for i, t in enumerate(settings.transports):
        _transport_files(f"transport[{i}]", t, environ, out)
    for i, listener in enumerate(settings.listeners):
        _listener_tls(f"listener[{i}]", listener, settings.server.spool_dir, out)
    _bindings(settings, out)
    _spool(settings.server.spool_dir, out)
    _spool_url(settings, out)
    await _postgres(settings, out)
    if settings.tracking.enabled:
        tracking = settings.tracking.path or settings.server.spool_dir / "tracking.db"
        _schema("tracking.path", tracking_schema.SCHEMA, tracking, out)
    report = PreflightReport(warnings=out.warnings)
    if not out.problems:
        for i, t in enumerate(settings.transports):
            try:
                report.transports[t.name] = build_transport(t)
            except Relay365Error as e:
                out.problems.append(str(e))
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                out.problems.append(f"transport[{i}] ({t.name}): {e}")
    if out.problems:
        await report.close()
        raise PreflightError(out.problems)
    return report


# -- transports: secrets, token caches, certificate and CA files -------------------------------------
def _transport_files(
    key: str, t: TransportSettings, environ: Mapping[str, str] | None, out: Findings
) -> None:
    m = t.m365
    for ref in (t.password, m.client_secret):
        if ref is not None:
            try:
                load_secret(ref, environ)
            except Relay365Error as e:
                out.problems.append(str(e))
    if t.client_cert_file is not None:
        check_pair(f"{key}.client_cert_file", t.client_cert_file, t.client_key_file, out)
    elif t.client_key_file is not None:
        out.problems.append(f"{key}.client_key_file: a key without client_cert_file; give both.")
    if m.certificate_file is not None:
        check_pair(f"{key}.certificate_file", m.certificate_file, None, out)
    for name, path in (("ca_file", t.ca_file), ("authority_ca_file", m.authority_ca_file)):
        if path is not None:
            check_ca(f"{key}.{name}", path, out)
    oauth = t.type == "graph" or (t.type == "submission" and m.auth == "xoauth2")
    delegated = oauth and m.client_secret is None and m.certificate_file is None
    if delegated and m.token_cache is None:
        out.problems.append(
            f"{key} ({t.name}): OAuth needs client_secret_env/client_secret_file, certificate_file, or a"
            " token_cache for a delegated sign-in ('relay365 login')."
        )
    if m.token_cache is not None:
        _token_cache(f"{key}.token_cache", t.name, m.token_cache, delegated, out)


def _token_cache(key: str, name: str, path: Path, delegated: bool, out: Findings) -> None:
    if not path.parent.is_dir():
        out.problems.append(f"{key}: the folder {path.parent} does not exist.")
        return
    if not path.exists():
        if delegated:
            out.warnings.append(
                f"{key}: no sign-in yet ({path} does not exist): run 'relay365 login {name}';"
                " mail for this transport waits in the queue until then."
            )
        return
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        out.problems.append(f"{key}: cannot read {path}: {getattr(e, 'strerror', None) or e}.")
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        out.problems.append(
            f"{key}: {path} holds a refresh token and is readable by others (mode {mode:o});"
            " run 'chmod 600' on it."
        )
    try:
        json.loads(text or "{}")
    except ValueError:
        out.problems.append(f"{key}: {path} is not a token cache (not JSON); run 'relay365 login {name}'.")


# -- listeners: certificates and the TLS context serve builds ----------------------------------------
def _listener_tls(key: str, listener: ListenerSettings, spool_dir: Path, out: Findings) -> None:
    label = f"{key} ({listener.name})"
    if listener.client_ca_file is not None:
        check_ca(f"{key}.client_ca_file", listener.client_ca_file, out)
    if listener.tls == "none":
        return
    before = len(out.problems)
    if listener.cert_file is not None and listener.key_file is not None:
        chains = [(listener.cert_file, listener.key_file)]
        leaf = check_pair(f"{key}.cert_file", listener.cert_file, listener.key_file, out)
        if leaf is not None and listener.legacy and not is_rsa(leaf):
            out.warnings.append(
                f"{label}: a legacy listener with a non-RSA certificate ({listener.cert_file}); devices"
                " that offer only RSA key exchange (TLS 1.0 printers) cannot connect. Use an RSA"
                " certificate, or leave cert_file out for the self-signed RSA + ECDSA pair."
            )
    else:
        # Made at serve's first start; only the pairs that already exist can be checked here.
        pairs = [self_signed_paths(spool_dir / "tls", k) for k in self_signed_types(listener)]
        chains = [(c, k) for c, k in pairs if c.is_file() and k.is_file()]
        for cert, private in chains:
            check_pair(f"{label} self-signed certificate", cert, private, out)
    if len(out.problems) > before or not chains:
        return
    try:
        server_context(listener, chains=chains)
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        out.problems.append(f"{label}: the TLS settings do not load: {e}.")


# -- addresses, ports and the spool ------------------------------------------------------------------
def _bindings(settings: Settings, out: Findings) -> None:
    binds = [
        (f"listener[{i}] ({x.name})", x.address, x.port) for i, x in enumerate(settings.listeners) if x.port
    ]
    if settings.admin.port:
        binds.append(("admin", settings.admin.address, settings.admin.port))
    for (a, a_addr, a_port), (b, b_addr, b_port) in combinations(binds, 2):
        if a_port == b_port and _overlap(a_addr, b_addr):
            out.problems.append(
                f"{a} on {a_addr}:{a_port} and {b} on {b_addr}:{b_port} would bind the same port."
            )


def _overlap(a: str, b: str) -> bool:
    x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    return x.version == y.version and (x == y or x.is_unspecified or y.is_unspecified)


def _spool_url(settings: Settings, out: Findings) -> None:
    try:
        where = locate(settings)
    except ConfigError as e:
        out.problems.append(str(e))
        return
    if where.scheme == "memory":
        out.warnings.append(
            "spool.url = memory: keeps the queue in memory only; every queued message is lost when"
            " relay365 stops (for tests)."
        )
    elif where.path is not None and where.path != settings.server.spool_dir:
        _spool(where.path, out, key="spool.url")


async def _postgres(settings: Settings, out: Findings) -> None:
    try:
        where = locate(settings)
    except ConfigError:
        return  # reported by _spool_url
    if where.scheme != "postgresql":
        return
    try:
        from relay365.spool.pg_check import probe  # psycopg: only for a PostgreSQL spool

        target = pg_target(settings)
        status = await probe(target)
    except Relay365Error as e:
        out.problems.append(str(e))
        return
    out.problems.extend(status.problems(target.shown()))


def _spool(directory: Path, out: Findings, *, key: str = "server.spool_dir") -> None:
    base = directory
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        what = "is not a directory" if base == directory else f"cannot be created: {base} is not a directory"
        out.problems.append(f"{key}: {directory} {what}.")
        return
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".relay365-preflight-"):
            pass
    except OSError as e:
        where = "" if base == directory else f" (to create {directory})"
        out.problems.append(f"{key}: cannot write in {base}{where}: {e.strerror}.")
        return
    db = directory / "queue.db"
    if db.exists():
        try:
            with db.open("r+b"):
                pass
        except OSError as e:
            out.problems.append(f"{key}: cannot open the queue {db} for writing: {e.strerror}.")
            return
        _schema(key, sqlite_schema.SCHEMA, db, out)


def _schema(key: str, schema: Schema, path: Path, out: Findings) -> None:
    """A database this relay365 can read: not one of a newer release (read-only, nothing written)."""
    try:
        check_version(schema, path)
    except Relay365Error as e:
        out.problems.append(f"{key}: {e}")
    except sqlite3.Error as e:
        out.problems.append(f"{key}: {path} is not a database relay365 can read: {e}.")


async def preflight_for(settings: Settings) -> PreflightReport:
    """The preflight ``serve`` runs before it binds a port, and ``config check`` runs on its own."""
    return await preflight(
        settings, build_transport=functools.partial(build_transport, hostname=settings.server.hostname)
    )
