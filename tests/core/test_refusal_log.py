"""Every 4xx/5xx the relay answers a device: one log line (peer, device, listener, command, reply)
and a Prometheus count per reply code and enhanced status code (issue 8, item 13)."""

from __future__ import annotations

import base64
import logging
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay365.credentials import hash_password
from tests.support import RawSMTP, closed_port, make_settings, running_relay, smarthost

LINE = re.compile(
    r"refused peer=(?P<peer>\S+) device=(?P<device>\S+) listener=(?P<listener>\S+)"
    r" command=(?P<command>\S+) reply='(?P<reply>[^']*)'"
)


def refusal_counts(text: str) -> dict[tuple[str, str], float]:
    return {
        (s.labels["code"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "relay365_smtp_refusals_total"
    }


async def test_each_refusal_is_one_log_line_and_counted_by_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        tmp_path,
        transport=[smarthost(closed_port())],
        listener=[{"name": "lan", "port": 0, "tls": "none", "allow_plaintext_auth": True}],
        server={"max_connections_per_ip": 2},
        device=[
            {"name": "app", "ip_allow": ["127.0.0.1/32"], "allowed_senders": ["app@contoso.com"]},
            {"name": "mfp", "password_hash": hash_password("right")},
        ],
        admin={"port": 0},
    )
    caplog.set_level(logging.INFO, logger="relay365")
    async with running_relay(settings) as relay:
        c = await RawSMTP.connect(relay.ports["lan"])
        await c.reply()
        replies = [await c.cmd("MAIL FROM:<app@contoso.com>")]  # 503: no EHLO yet
        await c.cmd("EHLO printer.lan")
        replies.append(await c.cmd("XYZZY"))  # 500: unknown command
        replies.append(await c.cmd("MAIL FROM:<ceo@contoso.com>"))  # 550 5.7.1
        replies.append(await c.cmd("RCPT TO:<bob@contoso.com>"))  # 503: no MAIL
        replies.append(await c.cmd("AUTH PLAIN " + base64.b64encode(b"\0mfp\0wrong").decode()))  # 535
        replies.append(await c.cmd("MAIL FROM:<app@contoso.com>"))
        replies.append(await c.cmd("RCPT TO:<bob@intranet>"))  # 504 5.5.2
        await c.cmd("RCPT TO:<bob@contoso.com>")
        await c.cmd("DATA")
        replies.append(await c.cmd(b"Subject: x\r\n\r\nbare\nLF\r\n."))  # 550 5.6.11
        second = await RawSMTP.connect(relay.ports["lan"])
        await second.reply()
        third = await RawSMTP.connect(relay.ports["lan"])
        replies.append(await third.reply())  # 421 4.7.0: over the per-address cap
        for x in (c, second, third):
            await x.close()

        codes = [r[:3] for r in replies]
        assert codes == ["503", "500", "550", "503", "535", "250", "504", "550", "421"], replies
        refused = [r for r in replies if r[0] in "45"]
        assert all(re.match(r"^\d{3} [245]\.\d{1,3}\.\d{1,3} ", r) for r in refused), refused
        lines = [LINE.search(r.getMessage()) for r in caplog.records if "refused peer=" in r.getMessage()]
        found = [m.groupdict() for m in lines if m]
        assert [f["reply"] for f in found] == refused, found
        assert {f["peer"] for f in found} == {"127.0.0.1"}
        assert {f["listener"] for f in found} == {"lan"}
        by_reply = {f["reply"][:3] + f["command"]: f["device"] for f in found}
        assert by_reply["503MAIL"] == "app" and by_reply["550DATA"] == "app"
        assert by_reply["500XYZZY"] == "app" and by_reply["535AUTH"] == "app"
        assert by_reply["421CONNECT"] == "app" and by_reply["504RCPT"] == "app"
        assert "user='mfp'" in caplog.text  # the AUTH line names the user it tried

        assert relay.admin is not None
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            text = (await http.get(f"http://127.0.0.1:{relay.admin.port}/metrics")).text
        counts = refusal_counts(text)
        assert counts[("550", "5.7.1")] == 1 and counts[("550", "5.6.11")] == 1
        assert counts[("503", "5.5.1")] == 2 and counts[("421", "4.7.0")] == 1
        assert counts[("535", "5.7.8")] == 1 and counts[("504", "5.5.2")] == 1
        assert sum(counts.values()) == len(refused)
