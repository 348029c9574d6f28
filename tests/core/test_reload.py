"""``Relay.reload``: a new configuration applied to a running relay, all or nothing, without dropping open
sessions or queued mail. Real device connections (smtplib, from chosen 127.0.0.x source addresses so
that devices can be told apart by IP) and real upstreams on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import smtplib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from relay365.credentials import hash_password
from relay365.errors import ReloadRefused
from relay365.service.notify import Notifier
from relay365.service.relay import Relay
from relay365.service.serve import Reloader
from relay365.settings import Settings
from tests.conftest import RecordingUpstream, make_settings, running_relay, smarthost
from tests.core.helpers import free_port, wait_until

LAN = {"name": "lan", "port": 0, "tls": "none", "allow_plaintext_auth": True}
PRINTER = {"name": "printer", "ip_allow": ["127.0.0.2/32"]}
OLD = {"name": "old", "ip_allow": ["127.0.0.3/32"]}
SCANNER_PW = "scan-to-mail-2027"


def scanner(password: str = SCANNER_PW) -> dict[str, Any]:
    return {"name": "scanner", "username": "scanner", "password_hash": hash_password(password)}


class Device:
    """A device's SMTP connection (smtplib, in a thread) from a chosen loopback address."""

    def __init__(self, port: int, source: str = "127.0.0.1", *, tls: ssl.SSLContext | None = None) -> None:
        self.smtp = smtplib.SMTP("127.0.0.1", port, timeout=15, source_address=(source, 0))
        self.smtp.ehlo("device.lan")
        if tls is not None:
            self.smtp.starttls(context=tls)
            self.smtp.ehlo("device.lan")

    async def call(self, name: str, *args: Any) -> Any:
        return await asyncio.to_thread(getattr(self.smtp, name), *args)

    async def send(self, rcpt: str, subject: str) -> tuple[int, bytes]:
        """MAIL, RCPT, DATA; the reply of the first step that is not a success, else DATA's."""
        code, text = await self.call("mail", "dev@contoso.com")
        if code != 250:
            await self.call("rset")
            return code, text
        code, text = await self.call("rcpt", rcpt)
        if code != 250:
            await self.call("rset")
            return code, text
        code, text = await self.call("data", f"Subject: {subject}\r\n\r\n{subject}\r\n".encode())
        return code, text

    def close(self) -> None:
        try:
            self.smtp.quit()
        except (smtplib.SMTPException, OSError):
            self.smtp.close()


OPEN: list[Device] = []  # closed after each test (``close_devices``), also when it fails


async def connect(port: int, source: str = "127.0.0.1", **kwargs: Any) -> Device:
    device = await asyncio.to_thread(lambda: Device(port, source, **kwargs))
    OPEN.append(device)
    return device


@pytest.fixture(autouse=True)
def close_devices() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().smtp.close()


def subjects(up: RecordingUpstream) -> list[str]:
    return [m.content.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for m in up.messages]


@pytest.fixture
async def second() -> Any:
    up = await RecordingUpstream().start()
    yield up
    await up.stop()


def two_transports(tmp_path: Path, one: int, two: int, *, route: str, **sections: Any) -> Settings:
    return make_settings(
        tmp_path,
        transport=[smarthost(one, name="one"), smarthost(two, name="two")],
        route=[{"name": "all", "transport": route}],
        **sections,
    )


async def test_an_open_session_keeps_working_and_the_new_devices_and_routes_apply(
    tmp_path: Path, upstream: RecordingUpstream, second: RecordingUpstream
) -> None:
    """One connection sends before and after the reload (the route change takes the second message to
    the new transport); a device added with a password logs in; a removed device is refused, also on a
    connection it opened before the reload (at its next MAIL)."""
    s1 = two_transports(
        tmp_path, upstream.port, second.port, route="one", listener=[LAN], device=[PRINTER, OLD]
    )
    async with running_relay(s1) as relay:
        port = relay.ports["lan"]
        printer = await connect(port, "127.0.0.2")
        old = await connect(port, "127.0.0.3")
        assert (await printer.send("a@contoso.com", "before"))[0] == 250
        await upstream.wait_for(1)

        s2 = two_transports(
            tmp_path, upstream.port, second.port, route="two", listener=[LAN], device=[PRINTER, scanner()]
        )
        report = await relay.reload(s2)
        assert (report.devices_added, report.devices_removed, report.routes_changed) == (
            ["scanner"],
            ["old"],
            True,
        )
        assert report.listeners == "unchanged" and relay.ports["lan"] == port

        assert (await printer.send("a@contoso.com", "after"))[0] == 250  # the same connection
        await second.wait_for(1)
        assert subjects(upstream) == ["before"] and subjects(second) == ["after"]

        code, text = await old.send("a@contoso.com", "removed")  # opened before the reload
        assert code == 530 and b"Authentication required" in text  # no longer known by its address
        fresh = await connect(port, "127.0.0.3")
        assert (await fresh.send("a@contoso.com", "removed"))[0] == 530

        device = await connect(port, "127.0.0.4")
        assert (await device.call("login", "scanner", SCANNER_PW))[0] == 235
        assert (await device.send("b@contoso.com", "scanner"))[0] == 250
        await second.wait_for(2)
        for d in (printer, old, fresh, device):
            await asyncio.to_thread(d.close)
    assert upstream.messages[0].rcpt_tos == ["a@contoso.com"]


async def test_a_changed_password_voids_an_open_login_at_the_next_mail(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    s1 = make_settings(tmp_path, listener=[LAN], device=[scanner()], transport=[smarthost(upstream.port)])
    async with running_relay(s1) as relay:
        device = await connect(relay.ports["lan"], "127.0.0.4")
        assert (await device.call("login", "scanner", SCANNER_PW))[0] == 235
        s2 = make_settings(
            tmp_path, listener=[LAN], device=[scanner("new-pass-2027")], transport=[smarthost(upstream.port)]
        )
        assert (await relay.reload(s2)).devices_changed == ["scanner"]
        code, text = await device.send("a@contoso.com", "x")
        assert code == 530 and b"Authentication required" in text
        with pytest.raises(smtplib.SMTPAuthenticationError):  # the old password no longer works
            await device.call("login", "scanner", SCANNER_PW)
        assert (await device.call("login", "scanner", "new-pass-2027"))[0] == 235  # the login was undone
        assert (await device.send("a@contoso.com", "relogged"))[0] == 250
        await upstream.wait_for(1)
        await asyncio.to_thread(device.close)


async def test_a_replaced_transport_finishes_its_delivery_in_flight_then_closes(
    tmp_path: Path, upstream: RecordingUpstream, second: RecordingUpstream
) -> None:
    """The message being delivered when the transport changes goes out on the old upstream; the old
    transport's session ends with QUIT after it; the next message goes to the new upstream."""
    s1 = make_settings(tmp_path, listener=[LAN], transport=[smarthost(upstream.port)])
    upstream.plan.stall_after_data = 1.0
    async with running_relay(s1) as relay:
        assert relay.scheduler is not None
        old = relay.transports["up"]
        device = await connect(relay.ports["lan"])
        assert (await device.send("a@contoso.com", "in flight"))[0] == 250

        async def delivering() -> bool:
            return relay.scheduler is not None and relay.scheduler.in_use.in_use(old) == 1

        await wait_until(delivering, 10, "the delivery to be in flight")
        report = await relay.reload(
            make_settings(tmp_path, listener=[LAN], transport=[smarthost(second.port)])
        )
        assert report.transports_replaced == ["up"] and relay.transports["up"] is not old
        await upstream.wait_for(1)  # finished on the old transport

        async def quit_sent() -> bool:
            return upstream.quits == 1

        await wait_until(quit_sent, 10, "the old transport to close its session")
        assert (await device.send("a@contoso.com", "next"))[0] == 250
        await second.wait_for(1)
        await asyncio.to_thread(device.close)
    assert subjects(upstream) == ["in flight"] and subjects(second) == ["next"]


async def test_an_unchanged_transport_keeps_running_and_a_rotated_secret_file_replaces_it(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    secret = tmp_path / "relay-password"
    secret.write_text("first-secret")
    secret.chmod(0o600)
    transport = smarthost(upstream.port, tls="none")
    s1 = make_settings(tmp_path, listener=[LAN], transport=[transport])
    async with running_relay(s1) as relay:
        kept = relay.transports["up"]
        report = await relay.reload(make_settings(tmp_path, listener=[LAN], transport=[transport]))
        assert report.transports_replaced == [] and relay.transports["up"] is kept
        assert "transports" not in report.summary()
        # hostname is part of what a transport is (it says EHLO with it): a change rebuilds it
        report = await relay.reload(
            make_settings(tmp_path, server={"hostname": "relay2.test"}, listener=[LAN], transport=[transport])
        )
        assert report.transports_replaced == ["up"] and relay.transports["up"] is not kept


def port_in_use() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 2).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_listeners_are_added_moved_and_removed_and_their_open_sessions_finish(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    p1, p2, p3 = free_port(), free_port(), free_port()
    a = {**LAN, "name": "a", "port": p1}
    b = {**LAN, "name": "b", "port": p2}
    s1 = make_settings(tmp_path, listener=[a, b], transport=[smarthost(upstream.port)])
    async with running_relay(s1) as relay:
        on_b = await connect(p2)
        # a and b swap ports (each is in the other's way: closed first, then bound); c is new
        s2 = make_settings(
            tmp_path,
            listener=[{**a, "port": p2}, {**b, "port": p1}, {**LAN, "name": "c", "port": p3}],
            transport=[smarthost(upstream.port)],
        )
        report = await relay.reload(s2)
        assert dict(relay.ports) == {"a": p2, "b": p1, "c": p3}
        assert report.listeners == "added a, b, c; closed a, b"
        assert (await on_b.send("x@contoso.com", "on the moved listener"))[0] == 250  # still served
        for port in (p1, p2, p3):
            device = await connect(port)
            assert (await device.send("x@contoso.com", f"to {port}"))[0] == 250
            await asyncio.to_thread(device.close)
        # c goes: its port stops accepting
        s3 = make_settings(
            tmp_path, listener=[{**a, "port": p2}, {**b, "port": p1}], transport=[smarthost(upstream.port)]
        )
        assert (await relay.reload(s3)).listeners == "closed c"
        assert refused(p3) and set(relay.ports) == {"a", "b"}
        await upstream.wait_for(4)
    # at shutdown a session on a listener closed by a reload is told 421 like any other
    assert await asyncio.to_thread(on_b.smtp.getreply) == (421, b"4.3.2 Service shutting down")


async def test_a_reload_that_cannot_bind_changes_nothing(tmp_path: Path, upstream: RecordingUpstream) -> None:
    """A new listener's port is taken: the reload is refused, the devices and routes it brought are not
    applied, and the listener that was in the way of the new binding serves again."""
    p1 = free_port()
    s1 = make_settings(
        tmp_path, listener=[{**LAN, "port": p1}], device=[PRINTER], transport=[smarthost(upstream.port)]
    )
    taken = port_in_use()
    try:
        async with running_relay(s1) as relay:
            s2 = make_settings(
                tmp_path,
                listener=[
                    {**LAN, "name": "moved", "port": p1},
                    {**LAN, "name": "new", "port": taken.getsockname()[1]},
                ],
                device=[OLD],
                transport=[smarthost(upstream.port)],
            )
            with pytest.raises(ReloadRefused, match=r"(?i)address already in use"):
                await relay.reload(s2)
            assert dict(relay.ports) == {"lan": p1} and relay.settings is s1
            device = await connect(p1, "127.0.0.2")  # still the old device table, on the old listener
            assert (await device.send("a@contoso.com", "still"))[0] == 250
            await upstream.wait_for(1)
            await asyncio.to_thread(device.close)
    finally:
        taken.close()


async def test_a_config_that_fails_the_preflight_is_refused(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    s1 = make_settings(tmp_path, listener=[LAN], transport=[smarthost(upstream.port)])
    async with running_relay(s1) as relay:
        bad = make_settings(
            tmp_path,
            listener=[LAN],
            transport=[
                smarthost(upstream.port, username="u", password_env="RELAY365_NO_SUCH_ENV", tls="required")
            ],
        )
        with pytest.raises(ReloadRefused, match="RELAY365_NO_SUCH_ENV"):
            await relay.reload(bad)
        assert relay.settings is s1 and relay.transports["up"] is not None
        device = await connect(relay.ports["lan"])
        assert (await device.send("a@contoso.com", "still"))[0] == 250
        await upstream.wait_for(1)
        await asyncio.to_thread(device.close)


def issue(ca: trustme.CA, directory: Path) -> tuple[Path, Path]:
    leaf = ca.issue_cert("relay.test", "127.0.0.1")
    cert, key = directory / "relay.crt", directory / "relay.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def client(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.check_hostname = False
    return ctx


async def test_a_renewed_certificate_is_served_to_new_connections(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    """The certificate files are replaced at the same path (a renewal) and the relay reloaded: new
    connections get the new one; a connection that did STARTTLS before goes on with the old one."""
    first, renewed = trustme.CA(), trustme.CA()
    cert, key = issue(first, tmp_path)
    listener = {"name": "lan", "port": 0, "tls": "starttls", "cert_file": str(cert), "key_file": str(key)}
    s1 = make_settings(tmp_path, listener=[listener], transport=[smarthost(upstream.port)])
    async with running_relay(s1) as relay:
        port = relay.ports["lan"]
        before = await connect(port, tls=client(first))
        issue(renewed, tmp_path)
        await relay.reload(make_settings(tmp_path, listener=[listener], transport=[smarthost(upstream.port)]))
        after = await connect(port, tls=client(renewed))  # verifies against the new CA only
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(port, tls=client(first))
        for device, subject in ((before, "old certificate"), (after, "new certificate")):
            assert (await device.send("a@contoso.com", subject))[0] == 250
            await asyncio.to_thread(device.close)
        await upstream.wait_for(2)


async def test_the_console_follows_the_reload(tmp_path: Path, upstream: RecordingUpstream) -> None:
    """[admin] changed: the console is restarted on its new port; the console shows the new transports
    (it reads the settings the relay runs with); [admin] without a port stops it."""
    s1 = make_settings(tmp_path, listener=[LAN], transport=[smarthost(upstream.port)], admin={"port": 0})
    async with running_relay(s1) as relay:
        first = relay.admin_url
        s2 = make_settings(
            tmp_path,
            listener=[LAN],
            transport=[smarthost(upstream.port), smarthost(upstream.port, name="second")],
            admin={"port": 0, "session_hours": 1.0},
        )
        assert (await relay.reload(s2)).console == "restarted"
        assert relay.admin_url != first and relay.console is not None
        async with httpx.AsyncClient() as http:
            assert (await http.get(relay.admin_url + "api/health")).status_code == 200
        assert [t.name for t in await relay.console.deps.status.transports()] == ["up", "second"]
        assert (
            await relay.reload(make_settings(tmp_path, listener=[LAN], transport=[smarthost(upstream.port)]))
        ).console == "stopped"
        assert relay.admin is None


async def test_what_needs_a_restart_is_reported_and_kept(tmp_path: Path, upstream: RecordingUpstream) -> None:
    s1 = make_settings(tmp_path, listener=[LAN], transport=[smarthost(upstream.port)])
    async with running_relay(s1) as relay:
        s2 = make_settings(
            tmp_path,
            server={"spool_dir": str(tmp_path / "elsewhere"), "max_connections": 7},
            listener=[LAN],
            transport=[smarthost(upstream.port)],
        )
        report = await relay.reload(s2)
        [note] = report.restart_needed
        assert note.startswith(
            f"server.spool_dir changed from {tmp_path / 'spool'} to {tmp_path / 'elsewhere'}"
        )
        assert "systemctl restart relay365" in note
        assert relay.settings.server.spool_dir == tmp_path / "spool"  # the open spool stays
        assert relay.settings.server.max_connections == 7  # the rest applies
        assert not (tmp_path / "elsewhere").exists()


async def test_sighup_without_a_config_file_is_refused_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The demo runs without a file: serve's reloader says so once and the relay runs on."""
    async with running_relay(make_settings(tmp_path, listener=[LAN])) as relay:
        reloader = Reloader(load=None, notify=Notifier(), reloaded=lambda relay, report: None)
        assert not await reloader.reload(relay)
        device = await connect(relay.ports["lan"])
        assert (await device.call("noop"))[0] == 250
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "reload refused, still running with the previous configuration: no configuration file to read"
        " again (the demo runs without one)"
    ]


async def test_a_stopped_relay_refuses_a_reload(tmp_path: Path) -> None:
    relay = Relay(make_settings(tmp_path, listener=[LAN]))
    with pytest.raises(ReloadRefused, match="not running"):
        await relay.reload(relay.settings)
