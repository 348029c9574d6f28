"""The one exception hierarchy of relay365.

::

    Relay365Error
     ├── ConfigError                 a configuration key has a bad value (names key and value)
     ├── SecretError                 a secret could not be loaded (env var missing, file mode too open)
     ├── PreflightError              serve cannot start: every problem the preflight found, one a line
     ├── DependencyVersionError      a pinned library whose internals relay365 uses has another version
     ├── SpoolError                  the spool could not store or read a message
     │    ├── SpoolFullError         no space left: ingress answers 452 4.3.1
     │    ├── SpoolIOError           any other I/O error: ingress answers 451 4.3.0
     │    │    └── SpoolSchemaError  the PostgreSQL spool's schema is missing, older or newer than
     │    │                          this build (``relay365 spool migrate``); the server is too old
     ├── SchemaVersionError          a database (queue.db, tracking.db) was written by a newer relay365:
     │                               refused, never misread (spool/schema_version.py)
     ├── ReloadRefused               a reload (SIGHUP) was refused: the running configuration is kept
     ├── QueueEntryNotFound          a queue id that is not in the spool
     ├── LeaseLost                   a delivery's claim on a message was taken over or the message
     │                               is gone: its outcome is not written (spool/contract.py)
     ├── Refusal                     ingress refuses what a device sent; carries the SMTP reply
     │    ├── CommandRefused         a command line (bare LF/CR, NUL, not UTF-8) or a shutdown
     │    └── MessageRefused         the message's header section (folded first line, limits)
     ├── TokenError                  an OAuth token could not be obtained (always transient for mail)
     ├── InstallError                init / service install refuse: a file exists, a path is unreachable
     ├── TraceError                  Microsoft 365's message trace could not be read (relay365.tracing)
     │    ├── TracePermissionError   403: the app lacks ExchangeMessageTrace.Read.All (or Microsoft's
     │    │                          message trace service principal is not provisioned)
     │    ├── TraceQueryError        400: Graph refused the query (a bug, or a window it does not serve)
     │    └── TraceUnavailableError  no answer: token, network, 5xx, 401, or throttled past the wait
     └── DeliveryError               raised by a transport for the whole message
          ├── TransientDeliveryError retry later, optionally not before ``retry_after`` seconds
          │    ├── UpstreamUnreachableError  no session at all (connect, TLS, greeting): the
          │    │                             upstream's mail is held back at once
          │    └── ConnectionLostError       the session was up, then broke: this message waits;
          │                                  the upstream is held only after several in a row
          └── PermanentDeliveryError the upstream refused for good: bounce with a DSN

Transports raise only the ``DeliveryError`` family. Anything else escaping a transport is a bug: the
scheduler records it as a transient failure of that attempt (``451 4.3.0 internal error: ...``).
The transient/permanent decision is made once, in the transport.
"""

from __future__ import annotations


class Relay365Error(Exception):
    """Base class of every error relay365 raises on purpose."""


class ConfigError(Relay365Error):
    """A configuration value is wrong. The message names the key and the value."""

    def __init__(self, key: str, value: object, problem: str) -> None:
        self.key = key
        self.value = value
        self.problem = problem
        super().__init__(f"Config '{key}' has value {value!r}. {problem}")


class SecretError(Relay365Error):
    """A secret could not be loaded. The message never contains the secret itself."""


class PreflightError(Relay365Error):
    """``relay365 serve`` cannot start (and ``config check`` fails) for these reasons, one a line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        lines = "".join(f"\n  - {p}" for p in self.problems)
        super().__init__(f"relay365 cannot start: {len(self.problems)} problem(s):{lines}")


class DependencyVersionError(Relay365Error):
    """A library relay365 reaches into (aiosmtpd, see ``ingress/compat.py``) is not the pinned version."""


class SpoolError(Relay365Error):
    """The spool could not store or read a message."""


class SpoolFullError(SpoolError):
    """No space left on the spool's file system (ENOSPC, EDQUOT)."""


class SpoolIOError(SpoolError):
    """Any other I/O error of the spool (EIO, permission, corrupt database)."""


class SpoolCommitUnknown(SpoolIOError):
    """A commit whose outcome is not known: an ingress worker's supervisor went away after it was sent
    the rows and before it answered. The rows may be in the queue, so the bodies stay: the device gets a
    4xx (it may send the message once more), and the spool's recovery keeps the bodies that have a row and
    removes the others once their owner is gone."""


class SpoolSchemaError(SpoolIOError):
    """The PostgreSQL spool's database has no relay365 schema, or one this build does not work with
    (older: ``relay365 spool migrate``; newer: upgrade this node), or the server is too old."""


class SchemaVersionError(Relay365Error):
    """A database was written by a newer relay365 than this one: its layout may mean something this
    release does not know, so it is not opened at all (the message says what to run instead)."""

    def __init__(self, message: str, *, found: int, supported: int) -> None:
        super().__init__(message)
        self.found = found
        self.supported = supported


class ReloadRefused(Relay365Error):
    """A new configuration was not applied (``Relay.reload``): the relay keeps running with the one it
    has. The message says why (the config error, the preflight problems, a port that cannot be bound)."""


class QueueEntryNotFound(Relay365Error):
    """No queue entry has this id."""


class LeaseLost(Relay365Error):
    """The caller no longer holds the claim on a queue entry (another owner took it over after the
    lease expired, or the entry was deleted): nothing was written. Not a ``SpoolError``: the spool
    works, and the other owner delivers the message."""


class Refusal(Relay365Error):
    """Ingress refuses what a device sent; ``reply`` is the exact SMTP reply to answer with."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        super().__init__(reply)


class CommandRefused(Refusal):
    """A command line is refused; ``close``: the connection is closed after the reply, because
    nothing the client sends after it can be trusted to be in sync (a bare LF, a shutdown)."""

    def __init__(self, reply: str, *, close: bool = False) -> None:
        super().__init__(reply)
        self.close = close


class MessageRefused(Refusal):
    """The message is refused at the end of DATA (its header section breaks a rule)."""


class TokenError(Relay365Error):
    """An OAuth2 token could not be obtained. Mail waiting for it is deferred, never bounced."""


class InstallError(Relay365Error):
    """``relay365 init`` or ``relay365 service install`` cannot do what was asked; the message says why
    and what to do instead."""


class TraceError(Relay365Error):
    """Microsoft 365's message trace (Graph) could not be read; ``status`` is the HTTP status, if any."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class TracePermissionError(TraceError):
    """Graph answered 403: the app registration lacks ExchangeMessageTrace.Read.All (admin consent), or
    the tenant has no service principal for Microsoft's message trace app. Not worth retrying soon."""


class TraceQueryError(TraceError):
    """Graph answered 400 to a message trace query."""


class TraceUnavailableError(TraceError):
    """The message trace did not answer usefully now (token, network, 5xx, 401, long throttling)."""


class DeliveryError(Relay365Error):
    """A transport could not deliver a message. Raised for the whole message."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        super().__init__(reply)


class TransientDeliveryError(DeliveryError):
    """Try again later; ``retry_after`` (seconds) is the earliest sensible retry, if known."""

    def __init__(self, reply: str, *, retry_after: float | None = None) -> None:
        super().__init__(reply)
        self.retry_after = retry_after


class UpstreamUnreachableError(TransientDeliveryError):
    """No session could be set up (connection refused or timed out, TLS handshake, 5xx greeting):
    RFC 3463 X.4.1 "no answer from host". Every message to this upstream would fail the same way."""


class ConnectionLostError(TransientDeliveryError):
    """The session was up and broke before the transaction completed (RFC 3463 X.4.2 "bad
    connection"): a fault of this attempt, not proof that the upstream is down."""


class PermanentDeliveryError(DeliveryError):
    """The upstream refused the message for good; ``code`` is its SMTP or HTTP status."""

    def __init__(self, reply: str, *, code: int = 550) -> None:
        super().__init__(reply)
        self.code = code
