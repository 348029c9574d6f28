"""The sandbox's mailboxes: every accepted message, on disk, plus counters of every rejection.

Each message is ``<root>/<id>.eml`` (the bytes as received) and ``<root>/<id>.json`` (its metadata).
The .eml is written first and the .json last, each through a temporary file, fsync and rename, so a
message is either listed completely or not at all, and the store survives restarts (the CLI reads the
same directory while the sandbox runs). Rejections are counted per ``"<endpoint> <code>"`` and kept in
``<root>/rejections.json``.
"""

from __future__ import annotations

import builtins
import dataclasses
import itertools
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay365.errors import Relay365Error

if TYPE_CHECKING:
    from collections.abc import Iterable

    from relay365.sandbox.clock import Clock
    from relay365.sandbox.tenant import Tenant

logger = logging.getLogger(__name__)

# Mailbox folders by their Graph well-known names (JunkEmail: "Junk Email"), plus two sandbox places:
# "Internet" holds what left the tenant for external recipients, "Quarantine" the hosted quarantine
# (not a mailbox folder: an admin releases from it, https://security.microsoft.com/quarantine).
FOLDERS = frozenset({"Inbox", "SentItems", "Internet", "Drafts", "JunkEmail", "Quarantine"})
_REJECTIONS_FILE = "rejections.json"
_SEQUENCE = itertools.count()  # see MailStore.add: the order of ids stored in one millisecond


class MessageNotFound(Relay365Error):
    """No stored message has this id."""


@dataclass(frozen=True)
class StoredMessage:
    """One stored copy of a message in one mailbox folder."""

    id: str
    folder: str
    mailbox: str
    endpoint: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    authenticated_as: str | None
    received_at: float
    size: int
    subject: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly dict (the admin API and the CLI print this)."""
        data = asdict(self)
        data["rcpt_tos"] = list(self.rcpt_tos)
        data["headers"] = [list(pair) for pair in self.headers]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoredMessage:
        return cls(
            id=str(data["id"]),
            folder=str(data["folder"]),
            mailbox=str(data["mailbox"]),
            endpoint=str(data["endpoint"]),
            mail_from=str(data["mail_from"]),
            rcpt_tos=tuple(str(r) for r in data["rcpt_tos"]),
            authenticated_as=None if data["authenticated_as"] is None else str(data["authenticated_as"]),
            received_at=float(data["received_at"]),
            size=int(data["size"]),
            subject=str(data["subject"]),
            headers=tuple((str(k), str(v)) for k, v in data["headers"]),
        )


def _decode(value: str) -> str:
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        return value


def parse_headers(content: bytes) -> tuple[tuple[str, str], ...]:
    """The header fields of an RFC 5322 message, RFC 2047 words decoded, folding removed."""
    message = BytesHeaderParser(policy=compat32).parsebytes(content)
    return tuple((name, " ".join(_decode(str(value)).split())) for name, value in message.items())


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class MailStore:
    """Thread-safe store of accepted messages and rejection counters under ``root``."""

    def __init__(self, root: Path, *, clock: Clock | None = None) -> None:
        self.root = root
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, StoredMessage] = {}
        root.mkdir(parents=True, exist_ok=True)
        self._rejections: dict[str, int] = self._load_rejections()

    # -- messages ---------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock.now() if self._clock is not None else time.time()

    def add(
        self,
        *,
        folder: str,
        mailbox: str,
        endpoint: str,
        mail_from: str,
        rcpt_tos: Iterable[str],
        authenticated_as: str | None,
        content: bytes,
    ) -> StoredMessage:
        """Store one copy of a message in ``mailbox``'s ``folder``."""
        if folder not in FOLDERS:
            raise ValueError(f"unknown folder {folder!r}; use one of {sorted(FOLDERS)}")
        headers = parse_headers(content)
        subject = next((v for k, v in headers if k.lower() == "subject"), "")
        received_at = self._now()
        # Milliseconds, then this process's sequence: copies stored in one millisecond (the copies of
        # one delivery, a frozen sandbox clock) still list in the order they were stored.
        message_id = f"{int(received_at * 1000):013d}-{next(_SEQUENCE):08x}{secrets.token_hex(3)}"
        message = StoredMessage(
            id=message_id,
            folder=folder,
            mailbox=mailbox.lower(),
            endpoint=endpoint,
            mail_from=mail_from,
            rcpt_tos=tuple(rcpt_tos),
            authenticated_as=authenticated_as,
            received_at=received_at,
            size=len(content),
            subject=subject,
            headers=headers,
        )
        with self._lock:
            _write_atomically(self.root / f"{message_id}.eml", content)
            metadata = json.dumps(message.to_json(), ensure_ascii=False, indent=1).encode("utf-8")
            _write_atomically(self.root / f"{message_id}.json", metadata)
            self._cache[message_id] = message
        logger.info(
            "stored %s in %s/%s via %s (from=%s, %d bytes)",
            message_id,
            message.mailbox,
            folder,
            endpoint,
            mail_from,
            message.size,
        )
        return message

    def _read(self, message_id: str) -> StoredMessage:
        cached = self._cache.get(message_id)
        if cached is not None:
            return cached
        path = self.root / f"{message_id}.json"
        try:
            message = StoredMessage.from_json(json.loads(path.read_bytes()))
        except FileNotFoundError as exc:
            raise MessageNotFound(message_id) from exc
        self._cache[message_id] = message
        return message

    def list(self, mailbox: str | None = None, folder: str | None = None) -> builtins.list[StoredMessage]:
        """Stored messages, oldest first, optionally only one mailbox and/or folder."""
        wanted_mailbox = mailbox.lower() if mailbox is not None else None
        with self._lock:
            ids = sorted(p.stem for p in self.root.glob("*.json") if p.name != _REJECTIONS_FILE)
            messages = [self._read(message_id) for message_id in ids]
        return [
            m
            for m in messages
            if (wanted_mailbox is None or m.mailbox == wanted_mailbox)
            and (folder is None or m.folder == folder)
        ]

    def move(self, message_id: str, folder: str) -> StoredMessage:
        """Move a stored copy to another folder of its mailbox (a quarantine release)."""
        if folder not in FOLDERS:
            raise ValueError(f"unknown folder {folder!r}; use one of {sorted(FOLDERS)}")
        current = self.get(message_id)
        moved = dataclasses.replace(current, folder=folder)
        with self._lock:
            metadata = json.dumps(moved.to_json(), ensure_ascii=False, indent=1).encode("utf-8")
            _write_atomically(self.root / f"{message_id}.json", metadata)
            self._cache[message_id] = moved
        logger.info("moved %s to %s/%s", message_id, moved.mailbox, folder)
        return moved

    def get(self, message_id: str) -> StoredMessage:
        """The metadata of one message; raises MessageNotFound."""
        if not message_id or "/" in message_id or message_id.startswith("."):
            raise MessageNotFound(message_id)
        with self._lock:
            return self._read(message_id)

    def content(self, message_id: str) -> bytes:
        """The bytes of one message as received; raises MessageNotFound."""
        self.get(message_id)
        return (self.root / f"{message_id}.eml").read_bytes()

    def deliver_accepted(
        self,
        *,
        tenant: Tenant,
        endpoint: str,
        mail_from: str,
        rcpt_tos: Iterable[str],
        authenticated_as: str | None,
        content: bytes,
        sender_mailbox_for_sent_items: str | None,
    ) -> builtins.list[StoredMessage]:
        """File an accepted message: internal recipients' Inbox, external ones' "Internet" outbox,
        and a Sent Items copy in ``sender_mailbox_for_sent_items`` when given."""
        recipients = tuple(rcpt_tos)
        stored: builtins.list[StoredMessage] = []
        seen: set[str] = set()
        for rcpt in recipients:
            address = rcpt.lower()
            if address in seen:
                continue
            seen.add(address)
            folder = "Inbox" if tenant.is_internal_address(address) else "Internet"
            stored.append(
                self.add(
                    folder=folder,
                    mailbox=address,
                    endpoint=endpoint,
                    mail_from=mail_from,
                    rcpt_tos=recipients,
                    authenticated_as=authenticated_as,
                    content=content,
                )
            )
        if sender_mailbox_for_sent_items is not None:
            stored.append(
                self.add(
                    folder="SentItems",
                    mailbox=sender_mailbox_for_sent_items,
                    endpoint=endpoint,
                    mail_from=mail_from,
                    rcpt_tos=recipients,
                    authenticated_as=authenticated_as,
                    content=content,
                )
            )
        return stored

    # -- rejections -------------------------------------------------------------------------

    def _load_rejections(self) -> dict[str, int]:
        path = self.root / _REJECTIONS_FILE
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError:
            logger.warning("ignoring unreadable %s", path)
            return {}
        return {str(k): int(v) for k, v in data.items()}

    def count_rejection(self, endpoint: str, code: str) -> None:
        """Count one rejection, e.g. ``count_rejection("submission", "432 4.3.2")``."""
        key = f"{endpoint} {code}"
        with self._lock:
            self._rejections[key] = self._rejections.get(key, 0) + 1
            data = json.dumps(self._rejections, indent=1, sort_keys=True).encode("utf-8")
            _write_atomically(self.root / _REJECTIONS_FILE, data)

    def rejections(self) -> dict[str, int]:
        """Counters of every rejection so far, keyed ``"<endpoint> <code>"``."""
        with self._lock:
            fresh = self._load_rejections()
            # Another process (the running sandbox) may have counted more than this one knows.
            for key, value in fresh.items():
                if value > self._rejections.get(key, 0):
                    self._rejections[key] = value
            return dict(self._rejections)
