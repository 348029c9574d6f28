"""The console's JSON API and pages over real HTTP, with real SMTP traffic through the relay: queue
filters and paging, actions (one, a selection, a filter), the message view, the trace (search, CSV),
devices (refusals with their reason), the overview, the OpenAPI document and live events."""

from __future__ import annotations

import asyncio
import csv
import html
import io
import json
import smtplib
from pathlib import Path
from typing import Any

import httpx

from tests.console.support import OPERATOR, bearer, login, running_console, wait_for
from tests.support import RecordingUpstream, closed_port, run_cli, smarthost, write_config


def send(port: int, rcpts: list[str], subject: str, sender: str = "scan@contoso.com") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        mid = subject.replace(" ", "-")
        msg = f"From: {sender}\r\nSubject: {subject}\r\nMessage-ID: <{mid}@mfp>\r\n\r\nbody\r\n"
        s.sendmail(sender, rcpts, msg.encode())


def refused_rcpt(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo()
        s.mail("scan@contoso.com")
        return s.rcpt("someone@blocked.example")


DOWN = {
    "transport": [smarthost(closed_port())],
    "delivery": {"min_backoff": 600, "max_backoff": 600, "poll_interval": 0.1},
}


async def test_queue_filters_actions_and_message_view(tmp_path: Path) -> None:
    async with running_console(tmp_path, **DOWN) as c, c.client(headers=bearer(c.token)) as http:
        port = c.relay.ports["lan"]
        for i in range(7):
            rcpts = [f"user{i}@contoso.com"] + (["boss@fabrikam.com"] if i % 3 == 0 else [])
            await asyncio.to_thread(send, port, rcpts, f"scan {i}")

        async def tried() -> bool:
            r = (await http.get("/api/queue", params={"state": "deferred"})).json()
            return bool(r["total"] >= 1)

        await wait_for(tried, what="a deferred message")  # then the upstream is held back
        assert (await http.get("/api/queue", params={"state": "open"})).json()["total"] == 7
        page = (await http.get("/api/queue", params={"limit": 3})).json()
        assert page["total"] == 7 and len(page["messages"]) == 3 and page["next_cursor"]
        newest = page["messages"][0]
        assert newest["subject"] == "scan 6" and newest["message_id"] == "scan-6@mfp"
        first = (await http.get("/api/queue", params={"state": "deferred"})).json()["messages"][-1]
        rcpt = first["recipients"][0]
        assert rcpt["state"] == "deferred" and rcpt["transport"] == "up"
        assert rcpt["last_reply"].startswith("451 4.4.1") and rcpt["explanation"]  # the catalogue knows 4.4.1
        rest = (await http.get("/api/queue", params={"limit": 10, "cursor": page["next_cursor"]})).json()
        assert [m["subject"] for m in rest["messages"]] == ["scan 3", "scan 2", "scan 1", "scan 0"]
        fab = (await http.get("/api/queue", params={"recipient": "@fabrikam.com"})).json()
        assert sorted(m["subject"] for m in fab["messages"]) == ["scan 0", "scan 3", "scan 6"]
        assert (await http.get("/api/queue", params={"transport": "up"})).json()["total"] >= 1
        assert (await http.get("/api/queue", params={"transport": "other"})).json()["total"] == 0
        for bad, word in (
            ({"state": "lost"}, "state"),
            ({"limit": "0"}, "limit"),
            ({"min_age": "soon"}, "min_age"),
        ):
            r = await http.get("/api/queue", params=bad)
            assert r.status_code == 400 and word in r.json()["error"]

        # Hold a filter's worth, release a selection, delete one.
        r = await http.post(
            "/api/queue/actions", json={"action": "hold", "filter": {"recipient": "@fabrikam.com"}}
        )
        assert r.status_code == 200 and len(r.json()["done"]) == 3
        held = (await http.get("/api/queue", params={"state": "held"})).json()
        assert held["total"] == 3
        ids = [m["queue_id"] for m in held["messages"]][:2]
        r = await http.post("/api/queue/actions", json={"action": "release", "ids": [*ids, "NOSUCHID"]})
        assert r.json()["done"] == ids and r.json()["missing"] == ["NOSUCHID"]
        assert (await http.get("/api/queue", params={"state": "held"})).json()["total"] == 1
        for bad in ({"action": "hold"}, {"action": "explode", "ids": []}, {"action": "hold", "filter": {}}):
            assert (await http.post("/api/queue/actions", json=bad)).status_code == 400
        assert (await http.post(f"/api/queue/{ids[0]}/explode")).status_code == 404
        assert (await http.post(f"/api/queue/{ids[0]}/delete")).status_code == 200
        assert (await http.post(f"/api/queue/{ids[0]}/delete")).status_code == 404

        # The message view: envelope, headers, recipients, trace; still answers after deletion.
        view = (await http.get(f"/api/queue/{ids[1]}")).json()
        assert dict(view["headers"])["Subject"] in ("scan 0", "scan 3", "scan 6")
        assert dict(view["headers"])["Received"].startswith("from ")
        kinds = [e["kind"] for e in view["events"]]
        assert kinds[:4] == ["received", "received", "held", "held"] and "released" in kinds
        tried_view = (await http.get(f"/api/queue/{first['queue_id']}")).json()
        tried_kinds = [e["kind"] for e in tried_view["events"]]
        assert tried_kinds.index("received") < tried_kinds.index("routed") < tried_kinds.index("attempted")
        assert tried_kinds.index("attempted") < tried_kinds.index("deferred")
        assert tried_view["routes"][0]["detail"] == "default: catch-all route"
        gone = (await http.get(f"/api/queue/{ids[0]}")).json()
        assert gone["entry"] is None and gone["events"][-1]["kind"] == "deleted"
        assert (await http.get("/api/queue/0000000000000NOPE")).status_code == 404

        # The same through the pages (an operator session).
        async with c.client() as browser:
            await login(browser, OPERATOR)
            q = await browser.get("/queue", params={"recipient": "@fabrikam.com"})
            assert q.status_code == 200 and "2 message(s) match" in q.text and "scan 1<" not in q.text
            q = await browser.get("/queue", params={"state": "deferred"})
            assert "451 4.4.1" in q.text and html.escape(rcpt["explanation"]) in q.text
            m = await browser.get(f"/message/{first['queue_id']}")
            assert "Route decision" in m.text and "catch-all route" in m.text
            assert (await browser.get("/queue", params={"state": "nope"})).status_code == 400


async def test_trace_search_csv_and_devices(tmp_path: Path) -> None:
    upstream = await RecordingUpstream().start()
    try:
        devices = [
            {"name": "mfp", "ip_allow": ["127.0.0.0/8"], "allowed_recipient_domains": ["contoso.com"]},
        ]
        sections = {"transport": [smarthost(upstream.port)], "device": devices}
        async with (
            running_console(tmp_path, **sections) as c,
            c.client(headers=bearer(c.viewer_token)) as http,
        ):
            port = c.relay.ports["lan"]
            await asyncio.to_thread(send, port, ["alice@contoso.com"], "Invoice =?utf-8?q?f=C3=BCr?= March")
            code, _ = await asyncio.to_thread(refused_rcpt, port)
            assert code == 550
            await upstream.wait_for(1)

            async def delivered() -> list[dict[str, str]]:
                r = await http.get(
                    "/api/trace", params={"recipient": "ALICE@contoso.com", "kind": "delivered"}
                )
                return list(r.json()["events"])

            [event] = await wait_for(delivered, what="the delivered event")
            assert event["subject"] == "Invoice für March" and event["transport"] == "up"
            everything = (await http.get("/api/trace", params={"recipient": "alice@contoso.com"})).json()
            assert [e["kind"] for e in everything["events"]] == [
                "delivered",
                "attempted",
                "routed",
                "received",
            ]
            assert everything["events"][-1]["device"] == "mfp"
            assert everything["events"][-1]["message_id"].startswith("Invoice")
            refused = (await http.get("/api/trace", params={"kind": "refused"})).json()["events"]
            assert refused[0]["recipient"] == "someone@blocked.example" and refused[0]["reply"].startswith(
                "550"
            )
            by_subject = (
                await http.get("/api/trace", params={"subject": "für", "since": "2020-01-01T00:00"})
            ).json()
            assert len(by_subject["events"]) == 4
            assert (await http.get("/api/trace", params={"since": "yesterday"})).status_code == 400

            exported = await http.get("/api/trace.csv", params={"recipient": "alice@contoso.com"})
            assert exported.headers["content-type"].startswith("text/csv")
            rows = list(csv.DictReader(io.StringIO(exported.text)))
            assert [r["kind"] for r in rows] == ["delivered", "attempted", "routed", "received"]
            assert rows[0]["subject"] == "Invoice für March"

            devs = (await http.get("/api/devices")).json()["devices"]
            mfp = next(d for d in devs if d["name"] == "mfp")
            assert mfp["messages_today"] == 1 and mfp["address"] == "127.0.0.1" and mfp["listener"] == "lan"
            assert mfp["last_refusal"].startswith("550") and mfp["last_seen"] > 0
            overview = (await http.get("/api/overview")).json()
            assert (
                overview["counts"]["hour"]["received"] == 1 and overview["counts"]["hour"]["delivered"] == 1
            )
            assert overview["counts"]["day"]["refused"] >= 1
            [t] = overview["transports"]
            assert t["name"] == "up" and t["state"] == "ok" and t["last_reply"].startswith("250")
    finally:
        await upstream.stop()


async def test_openapi_document_lists_every_api_route(tmp_path: Path) -> None:
    async with running_console(tmp_path) as c, c.client() as http:
        doc = (await http.get("/api/openapi.json")).json()
        assert doc["openapi"].startswith("3.1")
        routes = c.relay.admin.app.routes if c.relay.admin else []
        api_paths = {r.path for r in routes if getattr(r, "path", "").startswith(("/api", "/metrics"))}
        actions = {f"/api/queue/{{queue_id}}/{a}" for a in ("hold", "release", "retry", "delete")}
        expected = (api_paths - {"/api/openapi.json", "/api/queue/{queue_id}/{action}"}) | actions
        assert expected == set(doc["paths"])
        assert doc["paths"]["/api/health"]["get"]["security"] == []


async def test_live_events_stream_reports_changes(tmp_path: Path) -> None:
    async with (
        running_console(tmp_path, **DOWN) as c,
        c.client(headers=bearer(c.token)) as http,
        http.stream("GET", "/api/events") as stream,
    ):
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.aiter_lines()
        assert await anext(lines) == "retry: 2000"
        await asyncio.to_thread(send, c.relay.ports["lan"], ["bob@contoso.com"], "live")

        async def changed() -> bool:
            line = await asyncio.wait_for(anext(lines), 15)
            return line == "event: changed"

        await wait_for(changed, what="a changed event")


async def test_bad_form_bodies_and_unknown_pages(tmp_path: Path) -> None:
    async with running_console(tmp_path) as c, c.client() as http:
        csrf = await login(http, OPERATOR)
        big = "id=" + "A" * (1024 * 1024 + 10)
        r = await http.post(
            "/queue/action",
            content=big + "&csrf=" + csrf,
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 400 and "form larger" in r.text
        r = await http.post("/queue/action", data={"action": "retry", "scope": "filter", "csrf": csrf})
        assert r.status_code == 400 and "choose a filter first" in r.text
        assert (await http.get("/message/NOPE")).status_code == 404
        assert (await http.get("/mailboxes")).status_code == 404  # no sandbox in this process
        try:
            await http.get("/nowhere")
        except httpx.HTTPError:
            raise AssertionError("the console closed the connection") from None


async def test_the_api_and_queue_show_json_give_an_entry_in_one_shape(tmp_path: Path) -> None:
    """``/api/queue/ID``'s entry is what ``relay365 queue show ID --json`` prints (both are
    ``spool.model.entry_dict``), each recipient with the reply's explanation besides."""
    async with running_console(tmp_path, **DOWN) as c, c.client(headers=bearer(c.token)) as http:
        await asyncio.to_thread(
            send, c.relay.ports["lan"], ["user@contoso.com", "boss@fabrikam.com"], "one shape"
        )

        async def deferred() -> list[dict[str, Any]]:
            page = (await http.get("/api/queue", params={"state": "deferred"})).json()
            return list(page["messages"])

        [listed] = await wait_for(deferred, what="a deferred message")
        entry = (await http.get(f"/api/queue/{listed['queue_id']}")).json()["entry"]
        config = write_config(tmp_path, "cli.toml", **DOWN)  # the same spool directory
        shown = await asyncio.to_thread(
            run_cli, "queue", "show", entry["queue_id"], "--json", "-c", str(config)
        )
        assert shown.returncode == 0, shown.stderr
        cli = json.loads(shown.stdout)
        explanations = [r.pop("explanation") for r in entry["recipients"]]
        assert all(explanations) and entry["recipients"][0]["last_reply"].startswith("451 4.4.1")
        cli.pop("microsoft")  # queue show's part from the tracking log (none: nothing delivered)
        assert cli == entry
        for rcpt in listed["recipients"]:  # the list has the same shape as the message view
            rcpt.pop("explanation")
        assert listed == entry
        assert entry["subject"] == "one shape" and entry["message_id"] == "one-shape@mfp"
