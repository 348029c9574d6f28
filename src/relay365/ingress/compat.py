"""The one module that touches aiosmtpd's and asyncio's internals: aiosmtpd 1.4.6 behind a small API.

relay365 bends aiosmtpd in ways its public API does not cover (a streaming DATA, checked command lines,
STARTTLS with other reply texts, the connection-time cost of its ``auth_*`` lookup). Every such bend is
here, behind named public methods, and nowhere else (``tests/core/test_compat.py`` fails on a private
aiosmtpd or asyncio-stream attribute used anywhere else). The version is checked at import: another
aiosmtpd may rename or change any of these, so relay365 refuses to start rather than misbehave.

What is used, why, and where it is in aiosmtpd 1.4.6 (``aiosmtpd/smtp.py``) or CPython 3.11
(``Lib/asyncio/streams.py``). Names in the middle column are :class:`CompatSMTP`'s unless stated.

================================  =======================================  ================================
internal                          used for                                 where
================================  =======================================  ================================
``SMTP._cb_client_connected``     ``reader_connected()`` hook: the         smtp.py 574-580
                                  session's reader, before aiosmtpd reads
                                  the first command from it
``SMTP._reader``                  ``reader`` (relay DATA and sandbox BDAT  set at smtp.py 579; read at 649,
                                  read the stream themselves)              1433
``StreamReader._buffer``          ``SessionReader.unread()`` (bytes after  streams.py 411 (a ``bytearray``)
                                  the end of DATA go back),
                                  ``SessionReader.discard_buffered()``
reader ``__class__`` assignment   ``retype()``: aiosmtpd builds a plain    smtp.py 337-340, 649
                                  StreamReader and reads commands through
                                  it; a subclass checks them
``SMTP._set_rset_state``          ``reset_transaction_state()`` (EHLO      smtp.py 586-588
                                  answered by relay365)
``SMTP._set_post_data_state``     ``reset_after_data()`` and the           smtp.py 582-584; called at 588,
                                  ``transaction_reset()`` hook             1484, 1539
``SMTP._reset_timeout``           ``reset_idle_timer()`` (a long DATA is   smtp.py 557-562
                                  not idle)
``SMTP._tls_protocol``            ``tls_active``, ``start_tls()``          smtp.py 365, 917; aiosmtpd's own
                                                                           "TLS is on" test at 719, 855, 950
``SMTP._original_transport``      ``starttls_started``, ``raw_transport``  smtp.py 366, 927; the second
                                                                           ``connection_made`` at 501
``SSLProtocol._app_transport``    ``start_tls()`` (``smtp_STARTTLS``       smtp.py 914-940
                                  after its 220, for other reply texts)
``SMTP._handler_coroutine``       ``session_task``                         smtp.py 370, 525
``SMTP._handle_client``           ``before_greeting()`` hook               smtp.py 613; the greeting at 634
``SMTP._call_handler_hook``       ``call_handler_hook()``                  smtp.py 469-474
``SMTP._getaddr``                 a shortcut for ``<local@domain>`` that   smtp.py 1177-1204
                                  returns what aiosmtpd's parser returns
``inspect.getmembers`` and        ``__dir__()`` lists only hook names      smtp.py 396-404, 413-417,
``dir()`` in ``SMTP.__init__``    while ``SMTP.__init__`` runs (also       439-443
                                  ``CompatHandler``'s)
================================  =======================================  ================================

The last one replaces the process-wide ``aiosmtpd.smtp.inspect = ...`` that ``ingress/server.py`` used
to install: at every connection ``SMTP.__init__`` runs ``inspect.getmembers`` on the session and on its
handler (looking for ``auth_*`` methods) and ``dir()`` on both (``smtp_*``, ``handle_*``), about 0.1 ms
of CPU per connection (a one-message session costs 1.5-2 ms). ``getmembers`` lists what ``dir()``
returns, so while that constructor runs a :class:`CompatSMTP` (and a :class:`CompatHandler`) lists only
the names aiosmtpd looks for, computed once per class. aiosmtpd finds exactly the methods it found
before (``tests/core/test_fast_paths.py``); ``dir()`` is complete again as soon as the constructor
returns, and no module is patched.

No policy lives here: whether a command, an address or a message is accepted is decided by the session
classes (``ingress/server.py``, the sandbox endpoints) through aiosmtpd's handler hooks and their own
``smtp_*`` methods.
"""

from __future__ import annotations

import asyncio
import re
from asyncio import sslproto
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import aiosmtpd
from aiosmtpd.smtp import SMTP, TLSSetupException

from relay365.errors import DependencyVersionError

if TYPE_CHECKING:
    from asyncio.streams import _ReaduntilBuffer

AIOSMTPD_VERSION = "1.4.6"  # pinned in pyproject.toml; every line number above is of this version
RELIES_ON = (
    "SMTP._reader, _cb_client_connected, _set_rset_state, _set_post_data_state, _reset_timeout,"
    " _tls_protocol, _original_transport, _handler_coroutine, _handle_client, _call_handler_hook,"
    " _getaddr, the auth_* lookup in SMTP.__init__ and asyncio's StreamReader._buffer"
)


def check_version(found: str) -> None:
    """Refuse an aiosmtpd other than the one whose internals this module was written against."""
    if found != AIOSMTPD_VERSION:
        raise DependencyVersionError(
            f"relay365 needs aiosmtpd {AIOSMTPD_VERSION} (pinned): it relies on {RELIES_ON}"
            f" (relay365/ingress/compat.py); found {found}. Install it with:"
            f" pip install 'aiosmtpd=={AIOSMTPD_VERSION}'"
        )


check_version(aiosmtpd.__version__)

_HOOK_PREFIXES = ("auth_", "smtp_", "handle_")  # what SMTP.__init__ looks for with dir()/getmembers
# <local@domain> with dot-atoms only (RFC 5321 4.1.2): the form nearly every client sends. aiosmtpd's
# email-header parser gives the same address for it; anything else still goes through that parser.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(rf"[ \t]*<({_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*)>")


def _hook_names(cls: type) -> tuple[str, ...]:
    return tuple(n for n in dir(cls) if n.startswith(_HOOK_PREFIXES))


# -- the session's stream -------------------------------------------------------------------------
class SessionReader(asyncio.StreamReader):
    """The StreamReader of an SMTP session (aiosmtpd's own object, see :func:`retype`).

    aiosmtpd reads every command line with ``readuntil()`` (smtp.py 649, 655; AUTH responses of its own
    ``challenge_auth`` with ``readline()``, which calls ``readuntil()``): those go through
    :meth:`read_command_line`, which a subclass overrides to check them. Subclasses add no ``__init__``
    state of their own (they are made by retyping, not constructed).
    """

    async def readuntil(self, separator: _ReaduntilBuffer = b"\n") -> bytes:
        if separator != b"\n":  # not a command line (aiosmtpd's DATA reads up to b"\r\n")
            return await super().readuntil(separator)
        return await self.read_command_line()

    async def read_command_line(self) -> bytes:
        """The next line aiosmtpd reads as a command (or an AUTH response)."""
        return await self.read_raw_line()

    async def read_raw_line(self) -> bytes:
        """The next line up to LF, unchecked (``StreamReader.readuntil``)."""
        return await asyncio.StreamReader.readuntil(self, b"\n")

    def unread(self, data: bytes) -> None:
        """Put ``data`` back in front of what is buffered: the next read returns it first (pipelined
        commands that arrived in the same chunk as the end of DATA)."""
        self._buffer[0:0] = data  # type: ignore[attr-defined]  # streams.py 411

    def discard_buffered(self) -> None:
        """Drop everything received and not yet read (it is never read)."""
        self._buffer.clear()  # type: ignore[attr-defined]  # streams.py 411


_R = TypeVar("_R", bound=SessionReader)


def retype(reader: asyncio.StreamReader, cls: type[_R]) -> _R:
    """Make the session's reader an instance of ``cls``: the same object with the same buffer, so that
    aiosmtpd (``SMTP._reader``) and asyncio (``StreamReaderProtocol._stream_reader``, fed by
    ``data_received``) keep using it. aiosmtpd builds a plain ``asyncio.StreamReader`` in
    ``SMTP.__init__`` (smtp.py 337-340) and offers no way to choose its class."""
    if not isinstance(reader, asyncio.StreamReader) or not issubclass(cls, SessionReader):
        raise TypeError(f"cannot retype {type(reader).__name__} to {cls.__name__}")
    reader.__class__ = cls
    assert isinstance(reader, cls)
    return reader


# -- handler and session --------------------------------------------------------------------------
class _HookListing:
    """While aiosmtpd's constructor runs, ``dir()`` lists only the hook names it looks for."""

    _hook_names: ClassVar[tuple[str, ...]] = ()
    _listing_hooks: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._hook_names = _hook_names(cls)

    def __dir__(self) -> list[str]:
        if self._listing_hooks:
            return list(self._hook_names)
        return list(super().__dir__())


class CompatHandler(_HookListing):
    """Base class of an aiosmtpd handler (the object with ``handle_MAIL`` and the other hooks)."""


class CompatSMTP(_HookListing, SMTP):
    """aiosmtpd 1.4.6's ``SMTP`` with its internals behind public names. Subclass this, never ``SMTP``.

    Hooks for subclasses: :meth:`reader_connected`, :meth:`transaction_reset`, :meth:`before_greeting`.
    """

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        listed: list[_HookListing] = [self]
        if isinstance(handler, _HookListing) and handler is not self:
            listed.append(handler)
        for obj in listed:
            obj._listing_hooks = True
        try:
            super().__init__(handler, **kwargs)
        finally:
            for obj in listed:
                obj._listing_hooks = False

    # -- the stream ----------------------------------------------------------------------------
    @property
    def reader(self) -> SessionReader:
        """The session's reader (set once the connection is made)."""
        reader = self._reader
        assert isinstance(reader, SessionReader)
        return reader

    def _cb_client_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super()._cb_client_connected(reader, writer)  # smtp.py 574: sets _reader and _writer
        self.reader_connected(retype(reader, SessionReader))

    def reader_connected(self, reader: SessionReader) -> None:
        """Hook: the session's reader exists and aiosmtpd has not read from it yet. A subclass may
        :func:`retype` it to a :class:`SessionReader` subclass."""

    # -- transaction state ---------------------------------------------------------------------
    def reset_transaction_state(self) -> None:
        """A new, empty envelope, as RSET and EHLO make (RFC 5321 4.1.4)."""
        self._set_rset_state()  # type: ignore[no-untyped-call]

    def reset_after_data(self) -> None:
        """A new, empty envelope after a DATA (or BDAT LAST) transaction, whatever its outcome."""
        self._set_post_data_state()

    def _set_post_data_state(self) -> None:
        super()._set_post_data_state()  # type: ignore[no-untyped-call]  # smtp.py 582
        self.transaction_reset()

    def transaction_reset(self) -> None:
        """Hook: aiosmtpd has just made a new envelope (connection, HELO/EHLO, RSET, end of DATA,
        after STARTTLS)."""

    def reset_idle_timer(self) -> None:
        """Restart the idle timeout (aiosmtpd restarts it only when a command arrives)."""
        self._reset_timeout()

    async def call_handler_hook(self, command: str, *args: Any) -> Any:
        """The handler's ``handle_<command>`` result, or ``aiosmtpd.smtp.MISSING`` if it has none."""
        return await self._call_handler_hook(command, *args)

    # -- the connection ------------------------------------------------------------------------
    @property
    def tls_active(self) -> bool:
        """STARTTLS has started (aiosmtpd's own test: from the 220 on, before the handshake ends)."""
        return self._tls_protocol is not None

    @property
    def starttls_started(self) -> bool:
        """True once STARTTLS has put TLS under the session; ``connection_made`` is then called a
        second time, with the TLS transport, when the handshake is done (smtp.py 501)."""
        return self._original_transport is not None

    @property
    def raw_transport(self) -> asyncio.BaseTransport | None:
        """The TCP transport, also after STARTTLS (``transport`` is then the TLS one)."""
        return self._original_transport or self.transport

    @property
    def session_task(self) -> asyncio.Task[None] | None:
        """The task running this session's command loop (None before the connection is made)."""
        return self._handler_coroutine

    async def start_tls(self) -> None:
        """Put TLS under the session after the caller answered STARTTLS with 220 (RFC 3207 4).

        aiosmtpd 1.4.6 ``smtp_STARTTLS`` (smtp.py 914-940) without its replies, for a session that
        answers STARTTLS in its own words. Raises ``TLSSetupException`` (from the handshake error) when
        the handshake fails; aiosmtpd then closes the connection. Once the handshake is done aiosmtpd's
        ``connection_made`` resets the session and discards what the client sent before it (RFC 3207
        4.2).
        """
        assert self.tls_context is not None
        waiter = self.loop.create_future()
        tls = sslproto.SSLProtocol(self.loop, self, self.tls_context, waiter, server_side=True)
        self._tls_protocol = tls
        original = self.transport
        assert original is not None
        self._original_transport = original
        original.set_protocol(tls)
        self.transport = tls._app_transport
        tls.connection_made(original)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error

    async def _handle_client(self) -> None:
        if await self.before_greeting():  # smtp.py 613: the greeting, then the command loop
            await super()._handle_client()

    async def before_greeting(self) -> bool:
        """Hook: run before the 220 greeting; return False to end the session there (after sending a
        reply and closing the transport yourself)."""
        return True

    # -- MAIL / RCPT -----------------------------------------------------------------------------
    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's path parser (smtp.py 1177) with a shortcut for ``<local@domain>`` that gives the
        same result (``tests/core/test_fast_paths.py``) in ~2 us instead of ~70 us (email header parser)."""
        m = _SIMPLE_PATH.match(arg)
        rest = arg[m.end() :].lstrip(" \t") if m else "("
        if m is None or rest.startswith("(") or m.group(1).index("@") > (self.local_part_limit or 1 << 30):
            return super()._getaddr(arg)
        return m.group(1), rest
