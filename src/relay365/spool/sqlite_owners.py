"""Who is alive on a SQLite spool, and cleaning up after those who are not.

Every process that writes bodies or claims messages is an owner (``model.new_owner_id()``) and holds
an exclusive ``flock`` on ``owners/<owner>.lock`` for as long as its spool handle is open. The kernel
drops the lock when the process dies, however it dies (``kill -9`` included), so an owner whose lock
can be taken is provably dead, and one whose lock cannot be taken is alive: no timeouts, no guesses.

The lock file is created under a temporary name, locked, then renamed into place: whenever
``owners/<owner>.lock`` exists, its owner has held the lock since before anyone could see it. An
owner makes its body directory (``messages/<owner>``) and its first claim only after that, so a body
directory or a claim whose owner has no lock file belongs to a dead owner too (its lock file was
removed by an earlier recovery).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from relay365.spool.contract import Recovery

log = logging.getLogger(__name__)
_OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_owner(owner: str) -> str:
    """Owner ids become file names: letters, digits, ``._-``, at most 100 characters."""
    if not _OWNER.fullmatch(owner) or owner.endswith(".lock"):
        raise ValueError(f"not a valid spool owner id: {owner!r}")
    return owner


class OwnerLock:
    """This process's lock: held from ``acquire`` until ``release`` (or death)."""

    def __init__(self, owners_dir: Path, owner: str) -> None:
        self.owner = check_owner(owner)
        self.path = owners_dir / f"{owner}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = self.path.with_name(f".{self.owner}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(tmp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._fd = fd

    def release(self) -> None:
        """Close the lock: from now on this owner is dead to every other process. The file stays
        for ``recover`` (which also releases this owner's claims)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class _Dead:
    """Locks of dead owners taken for the cleanup (so no second recovery works on them at once)."""

    owners: dict[str, int | None] = field(default_factory=dict)  # owner -> locked fd (None: no file)

    def close(self) -> None:
        for fd in self.owners.values():
            if fd is not None:
                os.close(fd)


def _take_if_dead(owners_dir: Path, owner: str) -> tuple[bool, int | None]:
    """(dead?, the fd whose lock we now hold). An owner without a lock file is dead."""
    path = owners_dir / f"{owner}.lock"
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False, None
    return True, fd


def _candidates(conn: sqlite3.Connection, owners_dir: Path, messages_dir: Path) -> set[str]:
    found: set[str] = set()
    if owners_dir.is_dir():
        found |= {p.name[: -len(".lock")] for p in owners_dir.iterdir() if p.name.endswith(".lock")}
    found |= {p.name for p in messages_dir.iterdir() if p.is_dir()}
    leases = conn.execute("SELECT DISTINCT lease_owner FROM messages WHERE lease_owner != ''")
    found |= {row[0] for row in leases}
    return {o for o in found if _OWNER.fullmatch(o)}


def recover_dead(conn: sqlite3.Connection, *, owners_dir: Path, messages_dir: Path, me: str) -> Recovery:
    """On the spool's database thread: clean up after every dead owner (never ``me``, never a live
    one) and the bodies of a relay365 from before owners (``messages/<queue id>`` without a row)."""
    dead = _Dead()
    try:
        for owner in sorted(_candidates(conn, owners_dir, messages_dir) - {me}):
            is_dead, fd = _take_if_dead(owners_dir, owner)
            if is_dead:
                dead.owners[owner] = fd
        removed = _remove_flat_orphans(conn, messages_dir)
        released = 0
        found: list[str] = []  # newly found dead (a lock file left) or with something to clean up
        for owner, fd in dead.owners.items():
            bodies = _remove_orphans(conn, messages_dir / owner, owner)
            claims = conn.execute(
                "UPDATE messages SET lease_owner='', lease_until=0 WHERE lease_owner=?", (owner,)
            ).rowcount
            if fd is not None or bodies or claims:
                found.append(owner)
            removed += bodies
            released += claims
            with contextlib.suppress(OSError):
                (messages_dir / owner).rmdir()  # only when empty: its committed bodies stay
            with contextlib.suppress(OSError):
                (owners_dir / f"{owner}.lock").unlink()
        _remove_stale_tmp(owners_dir)
    finally:
        dead.close()
    return Recovery(tuple(found), removed, released)


def _remove_orphans(conn: sqlite3.Connection, directory: Path, owner: str) -> int:
    """A dead owner's files without a row: bodies it was still receiving (or had written for a
    commit that never happened)."""
    if not directory.is_dir():
        return 0
    known = {row[0] for row in conn.execute("SELECT queue_id FROM messages WHERE body_dir=?", (owner,))}
    removed = 0
    for p in directory.iterdir():
        if p.name not in known:
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def _remove_flat_orphans(conn: sqlite3.Connection, messages_dir: Path) -> int:
    """Bodies directly in messages/ come from a relay365 before owner directories (a crash of it left
    them); no running process writes there any more."""
    flat = [p for p in messages_dir.iterdir() if not p.is_dir()]
    if not flat:
        return 0
    known = {row[0] for row in conn.execute("SELECT queue_id FROM messages WHERE body_dir=''")}
    removed = 0
    for p in flat:
        if p.name not in known:
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def _remove_stale_tmp(owners_dir: Path) -> None:
    """A lock file a process died making (between create and rename): unlocked, so removable."""
    if not owners_dir.is_dir():
        return
    for p in owners_dir.glob(".*.tmp"):
        try:
            fd = os.open(p, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            p.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(fd)


def live_owners(owners_dir: Path) -> list[str]:
    """Owners whose lock is held now (a relay365 process works on the spool)."""
    if not owners_dir.is_dir():
        return []
    alive = []
    for p in sorted(owners_dir.glob("*.lock")):
        owner = p.name[: -len(".lock")]
        is_dead, fd = _take_if_dead(owners_dir, owner)
        if fd is not None:
            os.close(fd)
        if not is_dead:
            alive.append(owner)
    return alive
