"""The one exception hierarchy of relay365.

::

    Relay365Error
     ├── ConfigError                 a configuration key has a bad value (names key and value)
     ├── SecretError                 a secret could not be loaded (env var missing, file mode too open)
     ├── SpoolError                  the spool could not store or read a message
     │    ├── SpoolFullError         no space left: ingress answers 452 4.3.1
     │    └── SpoolIOError           any other I/O error: ingress answers 451 4.3.0
     ├── QueueEntryNotFound          a queue id that is not in the spool
     ├── TokenError                  an OAuth token could not be obtained (always transient for mail)
     ├── InstallError                init / service install refuse: a file exists, a path is unreachable
     └── DeliveryError               raised by a transport for the whole message
          ├── TransientDeliveryError retry later, optionally not before ``retry_after`` seconds
          └── PermanentDeliveryError the upstream refused for good: bounce with a DSN

Transports raise only the ``DeliveryError`` family; the scheduler catches only that family.
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


class SpoolError(Relay365Error):
    """The spool could not store or read a message."""


class SpoolFullError(SpoolError):
    """No space left on the spool's file system (ENOSPC, EDQUOT)."""


class SpoolIOError(SpoolError):
    """Any other I/O error of the spool (EIO, permission, corrupt database)."""


class QueueEntryNotFound(Relay365Error):
    """No queue entry has this id."""


class TokenError(Relay365Error):
    """An OAuth2 token could not be obtained. Mail waiting for it is deferred, never bounced."""


class InstallError(Relay365Error):
    """``relay365 init`` or ``relay365 service install`` cannot do what was asked; the message says why
    and what to do instead."""


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


class PermanentDeliveryError(DeliveryError):
    """The upstream refused the message for good; ``code`` is its SMTP or HTTP status."""

    def __init__(self, reply: str, *, code: int = 550) -> None:
        super().__init__(reply)
        self.code = code
