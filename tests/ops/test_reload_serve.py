"""SIGHUP to a ``relay365 serve`` subprocess (what ``systemctl reload`` sends): the config file is read
again and applied without dropping the connection a device has open; a broken file is refused with one
log line and the running configuration keeps serving; systemd hears RELOADING=1 (with MONOTONIC_USEC)
then READY=1 on a real NOTIFY_SOCKET datagram socket. Upstreams are Postfix's smtp-sink."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay365.credentials import hash_password
from tests.core.helpers import ServeProcess, SmtpSink, smarthost_cfg, smtp_sink, write_config
from tests.ops.test_notify import notify_socket, receive

LAN = {"name": "lan", "port": 0, "tls": "none", "allow_plaintext_auth": True}
PRINTER = {"name": "printer", "ip_allow": ["127.0.0.2/32"]}
OLD = {"name": "old", "ip_allow": ["127.0.0.3/32"]}
SCANNER_PW = "scan-to-mail-2027"


OPEN: list[smtplib.SMTP] = []  # closed after each test, also when it fails


@pytest.fixture(autouse=True)
def close_devices() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


def device(port: int, source: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=15, source_address=(source, 0))
    OPEN.append(smtp)
    smtp.ehlo("device.lan")
    if tls is not None:
        smtp.starttls(context=tls)
        smtp.ehlo("device.lan")
    return smtp


def send(smtp: smtplib.SMTP, subject: str) -> tuple[int, bytes]:
    """MAIL, RCPT, DATA; the first reply that is not a success, else DATA's."""
    for step, arg in (("mail", "dev@contoso.com"), ("rcpt", "alice@contoso.com")):
        code, text = getattr(smtp, step)(arg)
        if code != 250:
            smtp.rset()
            return code, text
    code, text = smtp.data(f"Subject: {subject}\r\n\r\n{subject}\r\n".encode())
    return code, text


def wait_for_dump(sink: SmtpSink, subject: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(f"Subject: {subject}\n".encode() in d for d in sink.dumps()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{subject!r} never reached smtp-sink")
        time.sleep(0.05)


def subjects(sink: SmtpSink) -> list[str]:
    return sorted(m.group(1).decode() for d in sink.dumps() if (m := re.search(rb"Subject: (.*)\n", d)))


def config(tmp_path: Path, one: int, two: int, *, route: str, device: list[dict[str, Any]]) -> Path:
    return write_config(
        tmp_path,
        listener=[LAN],
        device=device,
        transport=[smarthost_cfg(one, name="one", timeout=5), smarthost_cfg(two, name="two", timeout=5)],
        route=[{"name": "all", "transport": route}],
    )


def test_sighup_reloads_without_dropping_the_open_connection_and_refuses_a_broken_file(
    tmp_path: Path,
) -> None:
    scanner = {"name": "scanner", "username": "scanner", "password_hash": hash_password(SCANNER_PW)}
    seen: list[str] = []
    with smtp_sink() as one, smtp_sink() as two, notify_socket(tmp_path, "path") as (sock, value):
        path = config(tmp_path, one.port, two.port, route="one", device=[PRINTER, OLD])
        env = {**os.environ, "NOTIFY_SOCKET": value}
        env.pop("WATCHDOG_USEC", None)
        server = ServeProcess(path, tmp_path / "serve.log", env).start()
        try:
            receive(sock, "READY=1", seen)
            port = server.ports["lan"]
            printer = device(port, "127.0.0.2")
            assert send(printer, "before")[0] == 250
            wait_for_dump(one, "before")

            # devices and the route change; SIGHUP as `systemctl reload` sends it (ExecReload=)
            config(tmp_path, one.port, two.port, route="two", device=[PRINTER, scanner])
            signalled = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            os.kill(server.pid, signal.SIGHUP)
            reloading = receive(sock, "RELOADING=1", seen)
            usec = int(re.search(r"^MONOTONIC_USEC=(\d+)$", reloading, re.M).group(1))  # type: ignore[union-attr]
            assert signalled <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert f"STATUS=Reloading {path}" in reloading.split("\n")
            ready = receive(sock, "READY=1", seen)
            assert f"STATUS=Accepting mail on lan 127.0.0.1:{port}" in ready

            assert send(printer, "after")[0] == 250  # the same connection, the new route
            wait_for_dump(two, "after")
            old = device(port, "127.0.0.3")  # a removed device
            code, text = send(old, "removed")
            assert code == 530 and b"Authentication required" in text
            old.quit()
            app = device(port, "127.0.0.4")  # a new device with a password
            assert app.login("scanner", SCANNER_PW)[0] == 235
            assert send(app, "new device")[0] == 250
            wait_for_dump(two, "new device")
            app.quit()

            # a broken file: refused, said once, the running configuration keeps serving
            path.write_text(path.read_text() + "\n[[device]\nname = broken\n")
            os.kill(server.pid, signal.SIGHUP)
            receive(sock, "RELOADING=1", seen)
            refused = receive(sock, "READY=1", seen)
            assert "STATUS=Reload refused (Config 'config file' has value" in refused
            assert send(printer, "still")[0] == 250
            wait_for_dump(two, "still")
            printer.quit()
            assert server.terminate() == 0
        finally:
            server.kill()
        assert subjects(one) == ["before"] and subjects(two) == ["after", "new device", "still"]
    log = server.log_text()
    assert log.count("reload refused") == 1, log
    [line] = [x for x in log.splitlines() if "reload refused" in x]
    assert "still running with the previous configuration: Config 'config file'" in line
    assert "Not valid TOML" in line
    summary = (
        "listeners unchanged; devices added: scanner; devices removed: old; routes changed; console unchanged"
    )
    assert f"relay365.toml: {summary}" in log, log
    assert "Traceback" not in log


def issue(ca: trustme.CA, directory: Path) -> tuple[Path, Path]:
    leaf = ca.issue_cert("relay.test", "127.0.0.1")
    cert, key = directory / "relay.crt", directory / "relay.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return cert, key


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.check_hostname = False
    return ctx


def wait_for_log(server: ServeProcess, text: str, count: int = 1, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while server.log_text().count(text) < count:
        if time.monotonic() > deadline or (server.proc is not None and server.proc.poll() is not None):
            raise TimeoutError(f"{text!r} not logged {count} time(s):\n{server.log_text()}")
        time.sleep(0.05)
    return server.log_text()


def test_sighup_serves_a_renewed_certificate_and_opens_a_new_listener(tmp_path: Path) -> None:
    first, renewed = trustme.CA(), trustme.CA()
    cert, key = issue(first, tmp_path)
    lan = {"name": "lan", "port": 0, "tls": "starttls", "cert_file": str(cert), "key_file": str(key)}
    with smtp_sink() as sink:
        path = write_config(tmp_path, listener=[lan], transport=[smarthost_cfg(sink.port, timeout=5)])
        server = ServeProcess(path, tmp_path / "serve.log").start()
        try:
            port = server.ports["lan"]
            before = device(port, tls=trusting(first))
            issue(renewed, tmp_path)  # renewed in place, as certbot does
            write_config(
                tmp_path,
                listener=[lan, {"name": "submission", "port": 0, "tls": "implicit"}],
                transport=[smarthost_cfg(sink.port, timeout=5)],
            )
            os.kill(server.pid, signal.SIGHUP)
            log = wait_for_log(server, "reloaded ")
            assert "listeners added submission" in log
            added = int(re.findall(r"relay365 listening: submission on 127\.0\.0\.1:(\d+)", log)[-1])
            after = device(port, tls=trusting(renewed))  # only the new CA is trusted here
            try:
                device(port, tls=trusting(first))
                raise AssertionError("the old certificate was served after the reload")
            except ssl.SSLCertVerificationError:
                pass
            implicit = ssl.create_default_context()
            implicit.check_hostname, implicit.verify_mode = False, ssl.CERT_NONE
            with smtplib.SMTP_SSL("127.0.0.1", added, timeout=15, context=implicit) as new_listener:
                new_listener.ehlo("device.lan")
                assert send(new_listener, "on the new listener")[0] == 250
            for smtp, subject in ((before, "old certificate"), (after, "new certificate")):
                assert send(smtp, subject)[0] == 250
                smtp.quit()
            for subject in ("old certificate", "new certificate", "on the new listener"):
                wait_for_dump(sink, subject)
            assert server.terminate() == 0
        finally:
            server.kill()
