"""Reading one TOML table: typed getters that name the full dotted key in every ``ConfigError``, and
the value checks several sections share (networks, ports, sender patterns)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

from relay365.errors import ConfigError
from relay365.settings.model import NULL_SENDER, Network, SecretRef

T = TypeVar("T")


class Table:
    """A TOML table that remembers its dotted path, so every error names the full key."""

    def __init__(self, data: Mapping[str, Any], path: str, base: Path) -> None:
        self._data = dict(data)
        self._path = path
        self._base = base
        self._used: set[str] = set()

    @property
    def base(self) -> Path:
        """The config file's folder: relative paths are read against it."""
        return self._base

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def get(self, name: str, typ: type[T], default: T) -> T:
        self._used.add(name)
        if name not in self._data:
            return default
        value = self._data[name]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(self.key(name), value, f"Not a valid {typ.__name__}.")
        return value

    def opt(self, name: str, typ: type[T]) -> T | None:
        self._used.add(name)
        if name not in self._data or self._data[name] in ("", None):
            return None
        return self.get(name, typ, cast(T, None))

    def positive(self, name: str, typ: type[T], default: T) -> T:
        value = self.get(name, typ, default)
        if cast(float, value) <= 0:
            raise ConfigError(self.key(name), value, "Must be greater than 0.")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(name, str, default)
        if value not in choices:
            raise ConfigError(self.key(name), value, f"Must be one of: {', '.join(choices)}.")
        return value

    def strings(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(name, list, list(default))
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise ConfigError(f"{self.key(name)}[{i}]", item, "Not a non-empty string.")
        return tuple(str(v).strip() for v in value)

    def path(self, name: str) -> Path | None:
        value = self.opt(name, str)
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self._base / p)

    def existing_file(self, name: str) -> Path | None:
        p = self.path(name)
        if p is not None and not p.is_file():
            raise ConfigError(self.key(name), str(p), "No such file.")
        return p

    def table(self, name: str) -> Table:
        value = self.get(name, dict, {})
        return Table(value, self.key(name), self._base)

    def tables(self, name: str) -> list[Table]:
        value = self.get(name, list, [])
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise ConfigError(f"{self.key(name)}[{i}]", item, "Not a table.")
            out.append(Table(item, f"{self.key(name)}[{i}]", self._base))
        return out

    def secret(self, name: str) -> SecretRef | None:
        """``name_env`` or ``name_file``; a clear-text ``name`` is refused."""
        if name in self._data:
            raise ConfigError(
                self.key(name), "***", f"Put the secret in {name}_env or {name}_file, not the file."
            )
        env = self.opt(f"{name}_env", str)
        file = self.path(f"{name}_file")
        if env and file:
            raise ConfigError(self.key(f"{name}_env"), env, f"Give {name}_env or {name}_file, not both.")
        if env is None and file is None:
            return None
        return SecretRef(key=self.key(name), env=env, file=file)

    def done(self, *, extra_ok: bool = False) -> dict[str, Any]:
        unknown = {k: v for k, v in self._data.items() if k not in self._used}
        if unknown and not extra_ok:
            k = sorted(unknown)[0]
            raise ConfigError(self.key(k), unknown[k], "Unknown key.")
        return unknown


def network(key: str, value: str) -> Network:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(key, value, "Not an IP address or CIDR network.") from None


def port_number(t: Table, name: str, default: int) -> int:
    port = t.get(name, int, default)
    if not 0 <= port <= 65535:
        raise ConfigError(t.key(name), port, "Not a TCP port (0-65535).")
    return port


def sender_pattern(key: str, value: str) -> str:
    """An address, ``@domain``, ``*`` (any sender, the null sender included) or ``<>`` (the null
    sender only)."""
    v = value.lower()
    if v in ("*", NULL_SENDER) or (v.startswith("@") and "." in v) or ("@" in v and not v.startswith("@")):
        return v
    raise ConfigError(key, value, "Use an address, '@domain', '<>' (the null sender) or '*'.")
