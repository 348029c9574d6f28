"""Secrets: device password hashes (Argon2id), upstream secrets from env/0600 files, and redaction.

Every protocol and token log line passes through :class:`Redactor` (installed as a logging filter by
the composition root), so passwords, client secrets and tokens never reach a log.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
from collections.abc import Iterable, Mapping

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from relay365.errors import SecretError
from relay365.settings import SecretRef

# Argon2id with OWASP's recommended minimum (m=19 MiB, t=2, p=1): a relay verifies many device logins
# at once, and 64 MiB per verification (argon2-cffi's default) would let a burst of AUTHs exhaust memory.
# Existing hashes keep working: the parameters of each hash are read from the hash itself.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)

# A fixed hash to verify against when the username is unknown, so that a wrong username costs as much
# time as a wrong password (no user enumeration by timing).
_DUMMY_HASH = (
    "$argon2id$v=19$m=19456,t=2,p=1$tS10e78kNMaQY3XrO3jmvQ$y8r0Q1s/pNOcMsXVBlNTrAmUq3o+waajTcDbR1GO55c"
)


def hash_password(password: str) -> str:
    if not password:
        raise SecretError("An empty password cannot be hashed.")
    return _HASHER.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Constant-work check: an unknown user (``password_hash`` None) still costs one Argon2 verify."""
    try:
        return _HASHER.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def load_secret(ref: SecretRef, environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    if ref.env is not None:
        value = env.get(ref.env)
        if not value:
            raise SecretError(f"{ref.key}: environment variable {ref.env} is not set.")
        return value
    assert ref.file is not None
    try:
        st = ref.file.stat()
    except OSError as e:
        raise SecretError(f"{ref.key}: cannot read {ref.file}: {e.strerror}.") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(
            f"{ref.key}: {ref.file} is readable by others (mode {stat.S_IMODE(st.st_mode):o});"
            " run 'chmod 600' on it."
        )
    try:
        value = ref.file.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise SecretError(f"{ref.key}: cannot read {ref.file}: {e.strerror}.") from None
    except UnicodeDecodeError:
        raise SecretError(f"{ref.key}: {ref.file} is not UTF-8 text.") from None
    if not value:
        raise SecretError(f"{ref.key}: {ref.file} is empty.")
    return value


# SMTP AUTH arguments and continuation lines, XOAUTH2 blobs, bearer tokens, password=... pairs.
_PATTERNS = (
    re.compile(r"(?i)(\bAUTH\s+(?:PLAIN|LOGIN|XOAUTH2)\s+)\S+"),
    re.compile(r"(?i)(\bBearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(
        r"(?i)(\b(?:password|passwd|secret|client_secret|token|refresh_token|access_token)"
        r"[\"']?\s*[=:]\s*[\"']?)[^\s\"'&,;]+"
    ),
    re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"),  # JWTs
)
MASK = "***"


class Redactor(logging.Filter):
    """Masks known secret values and secret-shaped substrings in text and log records."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        for s in secrets:
            self.add(s)

    def add(self, secret: str) -> None:
        if len(secret) >= 4:
            with self._lock:
                self._secrets.add(secret)

    def redact(self, text: str) -> str:
        with self._lock:
            known = sorted(self._secrets, key=len, reverse=True)
        for s in known:
            if s in text:
                text = text.replace(s, MASK)
        for pat in _PATTERNS:
            text = pat.sub(lambda m: m.group(1) + MASK if m.lastindex else MASK, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        return True
