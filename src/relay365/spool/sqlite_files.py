"""The SQLite spool's message files: writing one as it arrives (``SqliteIncoming``) and reading one
for delivery (``SqliteBodyReader``). File work runs on the spool's I/O threads, never on the event
loop."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol, TypeVar

from relay365.errors import SpoolCommitUnknown, SpoolError, SpoolFullError, SpoolIOError
from relay365.spool.model import Envelope, new_queue_id

log = logging.getLogger(__name__)
T = TypeVar("T")
_IOV_MAX = 1024  # Linux UIO_MAXIOV: buffers per writev call


def spool_error(e: BaseException) -> SpoolError:
    """Map an OS or SQLite error to the spool's own errors (disk full vs any other I/O error)."""
    if isinstance(e, SpoolError):
        return e
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFullError(f"spool full: {e.strerror}")
    if isinstance(e, sqlite3.Error) and "full" in str(e):
        return SpoolFullError(f"spool full: {e}")
    return SpoolIOError(f"spool I/O error: {e}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MessageFiles(Protocol):
    """What a message being written needs of its spool (``SqliteSpool``)."""

    messages_dir: Path

    def owner_dir_name(self) -> str: ...

    def make_owner_dir(self) -> None: ...

    def check_room(self, size: int = 0) -> None: ...

    async def run_io(self, fn: Callable[[], T]) -> T: ...

    async def insert(self, queue_id: str, envelope: Envelope, size: int) -> None: ...


class SqliteIncoming:
    """One message being received, into ``messages/<owner>/<queue id>``.

    ``write`` only appends to a buffer (no system call on the event loop); ``drain`` hands the buffer
    to an I/O thread once it holds ``SPILL`` bytes, so memory per message stays bounded; ``commit``
    writes the rest, fsyncs and inserts the row. A small message is thus created, written and synced
    in one trip to an I/O thread, and the event loop never waits on the file system's locks.
    """

    SPILL = 128 * 1024

    def __init__(self, spool: MessageFiles, *, keep_reserve: bool = True) -> None:
        self._spool = spool
        self._keep_reserve = keep_reserve
        self.queue_id = new_queue_id()
        self.body_dir = spool.owner_dir_name()
        self.path = spool.messages_dir / self.body_dir / self.queue_id
        self.size = 0
        self._parts: list[bytes] = []  # kept as received and written with writev: no copies here
        self._buffered = 0
        self._fd: int | None = None
        self._closed = False
        self._lock = threading.Lock()  # one file operation at a time, even after a cancellation

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self._buffered += len(data)
        self.size += len(data)

    def _take(self) -> list[bytes]:
        parts, self._parts, self._buffered = self._parts, [], 0
        return parts

    async def drain(self) -> None:
        if self._buffered >= self.SPILL:
            parts = self._take()
            await self._spool.run_io(lambda: self._spill(parts))

    def _create(self) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            return os.open(self.path, flags, 0o600)
        except FileNotFoundError:
            # Our directory was taken away under us (an admin, a restore): make it again if the
            # messages directory is still there; if that is gone too, the error stands.
            self._spool.make_owner_dir()
            return os.open(self.path, flags, 0o600)

    def _spill(self, parts: list[bytes]) -> None:
        """In an I/O thread: create the file on first use and append ``parts``."""
        with self._lock:
            if self._closed:
                raise SpoolIOError(f"message {self.queue_id} was aborted")
            if self._keep_reserve:
                self._spool.check_room(sum(len(p) for p in parts))
            try:
                if self._fd is None:
                    self._fd = self._create()
                for i in range(0, len(parts), _IOV_MAX):
                    group = parts[i : i + _IOV_MAX]
                    written = os.writev(self._fd, group)
                    total = sum(len(p) for p in group)
                    if written < total:  # a short write: finish the rest plainly
                        view = memoryview(b"".join(group))[written:]
                        while view:
                            view = view[os.write(self._fd, view) :]
            except OSError as e:
                raise spool_error(e) from e

    def sync(self) -> None:
        """In an I/O thread: write what is buffered, fsync and close the file."""
        self._spill(self._take())
        with self._lock:
            assert self._fd is not None
            try:
                os.fsync(self._fd)
            except OSError as e:
                raise spool_error(e) from e
            finally:
                self._closed = True
                os.close(self._fd)
                self._fd = None

    async def commit(self, envelope: Envelope) -> str:
        try:
            await self._spool.run_io(self.sync)
            await self._spool.insert(self.queue_id, envelope, self.size)
        except SpoolCommitUnknown:
            # Its row may be in the queue: the body stays for that row (recovery removes it once this
            # owner is gone, if the row is not there).
            log.warning("message %s: committed or not is unknown; its file is kept", self.queue_id)
            raise
        except BaseException:
            await self.abort()
            raise
        return self.queue_id

    async def abort(self) -> None:
        self._take()
        with self._lock:
            self._closed = True
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None
        try:
            self.path.unlink(missing_ok=True)
        except OSError as e:  # the directory is gone or read-only: ``recover`` removes it later
            log.warning("could not remove aborted message %s: %s", self.queue_id, e)


class SqliteBodyReader:
    """A message file opened for delivery; every read runs on an I/O thread."""

    def __init__(
        self, fd: int, size: int, queue_id: str, run_io: Callable[[Callable[[], bytes]], Awaitable[bytes]]
    ) -> None:
        self._fd = fd
        self.size = size
        self._queue_id = queue_id
        self._run_io = run_io
        self._pos = 0

    def _error(self, e: OSError) -> SpoolIOError:
        return SpoolIOError(f"cannot read message file {self._queue_id}: {type(e).__name__}: {e.strerror}")

    def _pread(self, n: int, at: int) -> bytes:
        parts: list[bytes] = []
        while n > 0:
            try:
                data = os.pread(self._fd, min(n, 1 << 30), at)
            except OSError as e:
                raise self._error(e) from e
            if not data:
                break
            parts.append(data)
            at += len(data)
            n -= len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read(self, n: int = -1) -> bytes:
        want = self.size - self._pos if n < 0 else min(n, max(0, self.size - self._pos))
        data = await self._run_io(lambda: self._pread(want, self._pos)) if want else b""
        self._pos += len(data)
        return data

    async def chunks(self, n: int = 256 * 1024) -> AsyncIterator[bytes]:
        while chunk := await self.read(n):
            yield chunk

    async def read_all(self) -> bytes:
        self._pos = 0
        return await self.read()

    def fileno(self) -> int | None:
        return self._fd


def open_body(path: Path, queue_id: str) -> tuple[int, int]:
    """In an I/O thread: (fd, size) of a message file, or ``SpoolIOError`` naming the queue id."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise SpoolIOError(f"cannot read message file {queue_id}: {type(e).__name__}: {e.strerror}") from e
    try:
        return fd, os.fstat(fd).st_size
    except OSError as e:
        os.close(fd)
        raise SpoolIOError(f"cannot read message file {queue_id}: {type(e).__name__}: {e.strerror}") from e
