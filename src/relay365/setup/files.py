"""Writing a file the admin asked for: never over an existing one without ``force``, never half-written."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from relay365.errors import InstallError


def write_file(path: Path, text: str, *, mode: int, force: bool) -> bool:
    """Write ``text`` to ``path`` atomically (a temporary file renamed over it) with ``mode``.

    Returns False when ``path`` already holds exactly ``text`` (nothing to do); raises InstallError when
    it holds something else and ``force`` is not set. A replaced file keeps its owner and group (a config
    that ``relay365 service install`` shared with the service's group stays readable by the service).
    """
    data = text.encode("utf-8")
    try:
        current = path.read_bytes()
        owner = path.stat()
    except FileNotFoundError:
        current, owner = None, None
    except OSError as e:
        raise InstallError(f"cannot read {path}: {e.strerror}") from None
    if current == data:
        return False
    if current is not None and not force:
        raise InstallError(f"{path} exists and differs: not overwriting it (use --force to replace it)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if owner is not None and os.geteuid() == 0:
                os.chown(tmp, owner.st_uid, owner.st_gid)
            os.chmod(tmp, mode)  # the umask may have narrowed it
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    except OSError as e:
        raise InstallError(f"cannot write {path}: {e.strerror}") from None
    return True
