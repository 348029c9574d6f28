"""What a reload changes, decided before anything running is touched (``Relay.reload`` applies it).

* **Restart only.** The spool (``server.spool_dir``, ``[spool] url``, ``server.spool_min_free``), the
  tracking log's file (``[tracking] enabled``, ``path``) and ``server.log_format`` belong to what is open
  for the life of the process. A reload that changes them keeps the running values (``pin_restart_only``)
  and says, one warning each, that they take effect at the next restart.
* **Transports** are compared by a fingerprint: their settings, the host name they greet with, and the
  contents of every file and environment variable they read (secrets, certificates, CA bundles), so a
  client secret rotated in its ``*_file`` or a renewed certificate counts as a change even when
  relay365.toml did not change. Only transports whose fingerprint changed are replaced; the others keep
  their connections, tokens and pacing. The token cache of a delegated sign-in is left out: the relay
  rewrites it itself at every refresh.
* **The console** is restarted when ``[admin]`` or its certificate files changed (fingerprint likewise);
  signed-in admins then sign in again.

Fingerprints are SHA-256 digests kept in memory only; no secret is logged or stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from relay365.settings import AdminSettings, Settings, TransportSettings


def _file_digest(path: Path | None) -> str:
    if path is None:
        return "-"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:  # the preflight has refused an unreadable file already; a race: a change
        return f"unreadable: {e.errno}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def transport_fingerprint(
    t: TransportSettings, hostname: str, environ: Mapping[str, str] | None = None
) -> str:
    env = os.environ if environ is None else environ
    m = t.m365
    parts = [repr(t), hostname]
    for ref in (t.password, m.client_secret):
        if ref is not None:
            parts.append(_file_digest(ref.file) if ref.file else _digest(env.get(ref.env or "", "")))
    for path in (t.ca_file, t.client_cert_file, t.client_key_file, m.certificate_file, m.authority_ca_file):
        parts.append(_file_digest(path))
    return _digest("\0".join(parts))


def transport_fingerprints(settings: Settings) -> dict[str, str]:
    return {t.name: transport_fingerprint(t, settings.server.hostname) for t in settings.transports}


def admin_fingerprint(admin: AdminSettings, hostname: str) -> str:
    files = [_file_digest(admin.cert_file), _file_digest(admin.key_file)]
    return _digest("\0".join([repr(admin), hostname, *files]))


def pin_restart_only(running: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """``new`` with what only a restart can change kept as ``running`` has it; one line per change."""
    notes: list[str] = []

    def keep(key: str, old: object, value: object) -> None:
        if old != value:
            notes.append(
                f"{key} changed from {old!s} to {value!s}: this takes a restart"
                f" ('systemctl restart relay365'); still using {old!s}"
            )

    r, n = running, new
    keep("server.spool_dir", r.server.spool_dir, n.server.spool_dir)
    keep("server.spool_min_free", r.server.spool_min_free, n.server.spool_min_free)
    keep("server.log_format", r.server.log_format, n.server.log_format)
    if (r.spool.url, n.spool.url) != (f"sqlite:{r.server.spool_dir}", f"sqlite:{n.server.spool_dir}"):
        keep("spool.url", r.spool.url, n.spool.url)  # (not when it only follows spool_dir, said above)
    keep("tracking.enabled", r.tracking.enabled, n.tracking.enabled)
    keep("tracking.path", r.tracking.path, n.tracking.path)
    server = dataclasses.replace(
        n.server,
        spool_dir=r.server.spool_dir,
        spool_min_free=r.server.spool_min_free,
        log_format=r.server.log_format,
    )
    tracking = dataclasses.replace(n.tracking, enabled=r.tracking.enabled, path=r.tracking.path)
    return dataclasses.replace(n, server=server, spool=r.spool, tracking=tracking), notes


def _names_changed(old: Mapping[str, object], new: Mapping[str, object]) -> tuple[list[str], ...]:
    added = [k for k in new if k not in old]
    removed = [k for k in old if k not in new]
    changed = [k for k in new if k in old and old[k] != new[k]]
    return added, removed, changed


@dataclass
class ReloadReport:
    """What a reload did, for the log line and ``systemctl status``."""

    listeners: str = "unchanged"
    listeners_added: list[str] = field(default_factory=list)  # new, or bound on a new address or port
    transports_added: list[str] = field(default_factory=list)
    transports_replaced: list[str] = field(default_factory=list)
    transports_removed: list[str] = field(default_factory=list)
    devices_added: list[str] = field(default_factory=list)
    devices_removed: list[str] = field(default_factory=list)
    devices_changed: list[str] = field(default_factory=list)
    routes_changed: bool = False
    console: str = "unchanged"
    restart_needed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def devices(self, old: Settings, new: Settings) -> None:
        before = {d.name: d for d in old.devices}
        after = {d.name: d for d in new.devices}
        self.devices_added, self.devices_removed, self.devices_changed = _names_changed(before, after)
        self.routes_changed = old.routes != new.routes

    def summary(self) -> str:
        parts = [f"listeners {self.listeners}"]
        for what, names in (
            ("transports added", self.transports_added),
            ("transports replaced", self.transports_replaced),
            ("transports removed", self.transports_removed),
            ("devices added", self.devices_added),
            ("devices removed", self.devices_removed),
            ("devices changed", self.devices_changed),
        ):
            if names:
                parts.append(f"{what}: {', '.join(names)}")
        if self.routes_changed:
            parts.append("routes changed")
        parts.append(f"console {self.console}")
        return "; ".join(parts)
