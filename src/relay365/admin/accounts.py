"""Local admin accounts and API tokens, in one JSON file under the state directory.

Design: ``<spool_dir>/admin-users.json`` (or ``[admin] users_file``), mode 0600, owned by the service
user, written atomically (temporary file, fsync, rename) by ``relay365 admin passwd NAME`` and
``relay365 admin token ...``. The running console re-reads it when its modification time changes, so
accounts can be added or locked out without a restart. It is not in relay365.toml because the config
is often kept in version control and read by more people than may log in.

* Passwords: Argon2id hashes (``relay365.credentials``, OWASP parameters); an unknown name costs the
  same verification as a wrong password (no enumeration by timing).
* API tokens: ``r365_<id>_<secret>`` with 256 random bits; only the SHA-256 of the secret is stored. A
  slow hash adds nothing for a random 256-bit secret (it cannot be guessed), and every API call can be
  checked in microseconds. The token is shown once, when it is made.
* Roles: ``viewer`` (sees everything, changes nothing) and ``operator`` (also holds, releases, retries
  and deletes mail, downloads raw messages, runs the doctor).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay365.credentials import hash_password, verify_password
from relay365.errors import Relay365Error

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_TOKEN = re.compile(r"^r365_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")


class AccountError(Relay365Error):
    """An account or token operation cannot be done (bad name, unknown account, unreadable file)."""


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: an account (session) or an API token."""

    name: str
    role: Role
    via: str  # "session" or "token"

    @property
    def can_act(self) -> bool:
        return self.role is Role.OPERATOR


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise AccountError(f"{name!r} is not a valid name: letters, digits, '.', '_', '@', '-' (up to 64)")
    return name


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class AccountStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._data: dict[str, Any] = {"users": {}, "tokens": {}}
        self._mtime: float | None = None
        self._ephemeral: dict[str, dict[str, str]] = {}

    # -- file --------------------------------------------------------------------------------------
    def _reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._data, self._mtime = {"users": {}, "tokens": {}}, None
            return
        if mtime == self._mtime:
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise AccountError(f"cannot read the admin accounts in {self.path}: {e}") from None
        if not isinstance(data, dict):
            raise AccountError(f"{self.path} is not an admin accounts file")
        self._data = {"users": dict(data.get("users", {})), "tokens": dict(data.get("tokens", {}))}
        self._mtime = mtime

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self._data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._mtime = None

    # -- accounts ------------------------------------------------------------------------------------
    def set_password(self, name: str, password: str, role: Role) -> None:
        self._reload()
        self._data["users"][check_name(name)] = {"role": role.value, "hash": hash_password(password)}
        self._save()

    def remove(self, name: str) -> None:
        self._reload()
        if self._data["users"].pop(name, None) is None:
            raise AccountError(f"no admin account {name!r}")
        self._save()

    def add_ephemeral(self, name: str, password: str, role: Role) -> None:
        """An account that lives only in this process (the demo's one-time password)."""
        self._ephemeral[check_name(name)] = {"role": role.value, "hash": hash_password(password)}

    def users(self) -> dict[str, Role]:
        self._reload()
        every = {**self._data["users"], **self._ephemeral}
        return {name: Role(u.get("role", "viewer")) for name, u in sorted(every.items())}

    async def verify(self, name: str, password: str) -> Principal | None:
        """Argon2id in a worker thread (it takes tens of milliseconds by design)."""
        self._reload()
        user = self._ephemeral.get(name) or self._data["users"].get(name)
        stored = str(user["hash"]) if isinstance(user, dict) and "hash" in user else None
        if not await asyncio.to_thread(verify_password, stored, password) or user is None:
            return None
        return Principal(name, Role(user.get("role", "viewer")), "session")

    def role_of(self, name: str) -> Role | None:
        """The account's role now (a session ends when its account is removed)."""
        self._reload()
        user = self._ephemeral.get(name) or self._data["users"].get(name)
        return Role(user.get("role", "viewer")) if isinstance(user, dict) else None

    # -- API tokens ----------------------------------------------------------------------------------
    def create_token(self, name: str, role: Role) -> str:
        self._reload()
        token_id = secrets.token_hex(4)
        secret = secrets.token_urlsafe(32)
        self._data["tokens"][token_id] = {
            "name": check_name(name),
            "role": role.value,
            "sha256": _digest(secret),
            "created": time.time(),
        }
        self._save()
        return f"r365_{token_id}_{secret}"

    def revoke_token(self, token_id: str) -> None:
        self._reload()
        if self._data["tokens"].pop(token_id, None) is None:
            raise AccountError(f"no API token {token_id!r}")
        self._save()

    def tokens(self) -> dict[str, dict[str, Any]]:
        self._reload()
        return {i: {k: v for k, v in t.items() if k != "sha256"} for i, t in self._data["tokens"].items()}

    def check_token(self, token: str) -> Principal | None:
        m = _TOKEN.match(token.strip())
        if m is None:
            return None
        self._reload()
        entry = self._data["tokens"].get(m.group(1))
        if not isinstance(entry, dict):
            return None
        if not hmac.compare_digest(str(entry.get("sha256", "")), _digest(m.group(2))):
            return None
        return Principal(f"token:{entry.get('name', m.group(1))}", Role(entry.get("role", "viewer")), "token")
