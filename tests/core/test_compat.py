"""aiosmtpd is contained in ``relay365.ingress.compat``: the version is checked at import, nothing is
patched process-wide, and no other module (of the package, the tests or the benchmarks) touches a
private aiosmtpd or asyncio-stream attribute."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import pkgutil
import smtplib
import subprocess
import sys
import textwrap
from pathlib import Path

import aiosmtpd.smtp
import pytest

import relay365
from relay365.errors import DependencyVersionError
from relay365.ingress import compat
from relay365.ingress.compat import SessionReader, retype
from tests.core.internals import private_names, project_sources, violations
from tests.support import RecordingUpstream, make_settings, running_relay, smarthost

ROOT = Path(__file__).resolve().parents[2]
# The compat module itself, and the tests that compare its shortcuts with aiosmtpd's own code.
ALLOWED = ("src/relay365/ingress/compat.py", "tests/core/test_fast_paths.py", "tests/core/internals.py")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


# -- the version check ---------------------------------------------------------------------------------
def test_version_check_names_what_it_relies_on() -> None:
    compat.check_version("1.4.6")
    with pytest.raises(DependencyVersionError) as caught:
        compat.check_version("1.5.0")
    message = str(caught.value)
    assert message.startswith("relay365 needs aiosmtpd 1.4.6 (pinned): it relies on SMTP._reader")
    assert "StreamReader._buffer" in message and "found 1.5.0" in message
    assert "pip install 'aiosmtpd==1.4.6'" in message


def test_relay_does_not_import_with_another_aiosmtpd() -> None:
    """In a fresh interpreter whose aiosmtpd says it is 1.5.0, the relay and the sandbox refuse to load."""
    for module in ("relay365.ingress.server", "relay365.sandbox.submission"):
        r = run_python(
            f"""
            import aiosmtpd
            aiosmtpd.__version__ = "1.5.0"
            import {module}
            """
        )
        assert r.returncode == 1, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(
            "relay365.errors.DependencyVersionError: relay365 needs aiosmtpd 1.4.6 (pinned): it relies on"
        ), r.stderr
        assert "found 1.5.0" in last


# -- no process-wide patching --------------------------------------------------------------------------
def all_modules() -> list[str]:
    return [
        m.name
        for m in pkgutil.walk_packages(relay365.__path__, "relay365.")
        if not m.name.endswith("__main__")
    ]


async def test_no_process_wide_patching(tmp_path: Path, upstream: RecordingUpstream) -> None:
    for name in all_modules():
        importlib.import_module(name)
    settings = make_settings(tmp_path, transport=[smarthost(upstream.port)])
    async with running_relay(settings) as relay:
        port = relay.ports["lan"]

        def client() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.ehlo("printer.lan")
                s.mail("scanner@contoso.com")
                s.rcpt("alice@contoso.com")
                return s.data(b"Subject: scan\r\n\r\nhello\r\n")

        code, _ = await asyncio.to_thread(client)
        assert code == 250
        await upstream.wait_for(1)
        assert aiosmtpd.smtp.inspect is inspect


def test_importing_relay365_leaves_aiosmtpd_and_asyncio_as_they_were() -> None:
    """Every global of aiosmtpd's and asyncio's stream modules, and every attribute of their classes, is
    the same object before and after importing every relay365 module."""
    r = run_python(
        f"""
        import asyncio, asyncio.sslproto, asyncio.streams, importlib, inspect
        import aiosmtpd, aiosmtpd.smtp
        watched = [aiosmtpd, aiosmtpd.smtp, asyncio.streams, asyncio.sslproto, inspect,
                   aiosmtpd.smtp.SMTP, aiosmtpd.smtp.Session, aiosmtpd.smtp.Envelope,
                   asyncio.StreamReader, asyncio.StreamReaderProtocol, asyncio.sslproto.SSLProtocol]
        before = [dict(vars(w)) for w in watched]
        for name in {all_modules()!r}:
            importlib.import_module(name)
        changed = [
            f"{{getattr(w, '__name__', w)}}.{{k}}"
            for w, old in zip(watched, before)
            for k in set(old) | set(vars(w))
            if old.get(k, None) is not vars(w).get(k, None)
        ]
        print("changed:", sorted(changed))
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "changed: []"


# -- one module touches the internals ------------------------------------------------------------------
def test_only_compat_touches_aiosmtpd_internals() -> None:
    names = private_names()
    assert {"_reader", "_buffer", "_tls_protocol", "_set_rset_state", "_getaddr"} <= names.internal
    assert "_transport" in names.shared and "_tls_protocol" not in names.shared
    found = violations(project_sources(ROOT), names, allowed=ALLOWED)
    assert [str(v) for v in found] == []


def test_internals_check_finds_each_kind_of_access() -> None:
    """The check is not vacuous: each kind of access in a small module is reported, own names are not."""
    source = textwrap.dedent(
        """
        import asyncio
        import aiosmtpd.smtp
        from asyncio import sslproto
        from asyncio.streams import _ReaduntilBuffer
        from relay365.ingress.compat import CompatSMTP

        aiosmtpd.smtp.inspect = None

        class Base(CompatSMTP):
            pass

        class Session(Base):
            _reader = None

            def _getaddr(self, arg):
                return self._original_transport, self._lines

        class Plain:
            def __init__(self):
                self._buffer = b""

            def f(self, server):
                return self._buffer, server._tls_protocol, super()._set_rset_state(), server._transport
        """
    )
    names = private_names()
    compat_path = "src/relay365/ingress/compat.py"  # where CompatSMTP comes from (allowed itself)
    elsewhere = textwrap.dedent(
        """
        import httpx

        class Client:
            def __init__(self):
                self.http = httpx.AsyncClient()

            def f(self):
                return self.http._transport, self.http._tls_protocol
        """
    )
    sources = {
        compat_path: (ROOT / compat_path).read_text(),
        "src/relay365/sample.py": source,
        "src/relay365/elsewhere.py": elsewhere,
    }
    found = [(v.path, v.line, v.what) for v in violations(sources, names, allowed=[compat_path])]
    # httpx's _transport is not aiosmtpd's in a file that has no aiosmtpd objects; _tls_protocol is.
    assert found[0] == (
        "src/relay365/elsewhere.py",
        9,
        "uses aiosmtpd/asyncio internal self.http._tls_protocol",
    )
    assert [(line, what) for _, line, what in found[1:]] == [
        (4, "imports private asyncio.sslproto"),
        (5, "imports private asyncio.streams._ReaduntilBuffer"),
        (8, "patches aiosmtpd.smtp.inspect"),
        (14, "Session shadows aiosmtpd/asyncio internal _reader"),
        (16, "Session overrides aiosmtpd/asyncio internal _getaddr()"),
        (17, "uses aiosmtpd/asyncio internal self._original_transport"),
        (24, "uses aiosmtpd/asyncio internal server._tls_protocol"),
        (24, "uses aiosmtpd/asyncio internal server._transport"),
        (24, "uses aiosmtpd/asyncio internal super()._set_rset_state"),
    ]


# -- the stream API ------------------------------------------------------------------------------------
class Checked(SessionReader):
    async def read_command_line(self) -> bytes:
        return (await self.read_raw_line()).upper()


async def test_session_reader_unread_discard_and_command_lines() -> None:
    reader = asyncio.StreamReader()
    checked = retype(reader, Checked)
    assert checked is reader and isinstance(reader, Checked)
    reader.feed_data(b"mail from:<a@b>\r\nrcpt to:<c@d>\r\n")
    assert await reader.readuntil() == b"MAIL FROM:<A@B>\r\n"  # aiosmtpd's command read is checked
    assert await reader.readline() == b"RCPT TO:<C@D>\r\n"  # readline() (AUTH responses) too
    reader.feed_data(b"data\r\n.\r\n")
    assert await reader.readuntil(b"\r\n") == b"data\r\n"  # other separators are not command lines
    assert await reader.read(3) == b".\r\n"
    checked.unread(b"QUIT\r\n")
    reader.feed_data(b"NOOP\r\n")
    assert await reader.readexactly(12) == b"QUIT\r\nNOOP\r\n"
    reader.feed_data(b"junk")
    checked.discard_buffered()
    reader.feed_eof()
    assert await reader.read() == b""
    with pytest.raises(TypeError):
        retype(reader, asyncio.StreamReader)  # type: ignore[type-var]
