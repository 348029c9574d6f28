"""relay365.toml in, ``Settings`` out: the whole file checked at once (unknown keys, duplicate names),
each section by its reader (sections.py, transports.py)."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from relay365.errors import ConfigError
from relay365.settings import sections
from relay365.settings.model import RouteSettings, Settings
from relay365.settings.table import Table
from relay365.settings.transports import route, transport


def parse_settings(data: Mapping[str, Any], *, base: Path, source: Path | None = None) -> Settings:
    root = Table(data, "", base)
    server = sections.server(root.table("server"))
    listeners = tuple(sections.listener(t) for t in root.tables("listener"))
    devices = tuple(sections.device(t) for t in root.tables("device"))
    delivery = sections.delivery(root.table("delivery"))
    transports = tuple(transport(t) for t in root.tables("transport"))
    names = {t.name for t in transports}
    routes = tuple(route(t, names) for t in root.tables("route"))
    admin = sections.admin(root.table("admin"))
    tracking = sections.tracking(root.table("tracking"))
    spool = sections.spool(root.table("spool"), server)
    tracing = sections.tracing(root.table("tracing"), transports)
    root.done()
    _check_unique("listener", [(x.name, (x.address, x.port or x.name)) for x in listeners])
    _check_unique("device", [(d.name, d.username or d.name) for d in devices])
    _check_unique("transport", [(t.name, t.name) for t in transports])
    if transports and not routes:
        routes = (RouteSettings(name="default", transport=transports[0].name),)
    return Settings(
        server, listeners, devices, delivery, transports, routes, source, admin, tracking, spool, tracing
    )


def _check_unique(kind: str, items: list[tuple[str, object]]) -> None:
    seen_names: set[str] = set()
    seen_keys: set[object] = set()
    for i, (name, key) in enumerate(items):
        if name in seen_names or key in seen_keys:
            raise ConfigError(f"{kind}[{i}]", name, f"Duplicate {kind} (name, address or username).")
        seen_names.add(name)
        seen_keys.add(key)


def load_settings(path: Path) -> Settings:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError("config file", str(path), f"Cannot read it: {e.strerror}.") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("config file", str(path), f"Not valid TOML: {e}.") from None
    return parse_settings(data, base=path.resolve().parent, source=path)
