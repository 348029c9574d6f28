"""The console in a real browser: Debian's chromium, headless, driven by Playwright, against a relay
that delivers into the built-in Exchange Online sandbox (everything on 127.0.0.1).

Flows from issue 12: log in; find a deferred message through the trace by recipient; read the
explanation of its reply; retry it after the sandbox fault clears; see it delivered live (no reload);
hold and release; a viewer cannot delete; message HTML is rendered sandboxed (no script, no remote
loads). Every page is screenshotted into the test's directory (and into $RELAY365_SCREENSHOTS when
set, which is how docs/console/ is made)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import smtplib
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, Request, Route, async_playwright

from relay365.sandbox.faults import Fault
from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import example_tenant
from relay365.service.console import SandboxMailboxes
from relay365.service.demo import demo_settings
from relay365.service.relay import Relay
from tests.console.support import OPERATOR, VIEWER, make_accounts

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
BUSY = "451 4.7.500 Server busy. Please try again later."


@dataclass
class Setup:
    relay: Relay
    sandbox: Sandbox
    url: str
    shots: Path
    outside: list[str]  # requests the browser tried to send off the machine (must stay empty)

    async def shot(self, page: Page, name: str) -> None:
        path = self.shots / f"{name}.png"
        await page.screenshot(path=str(path), full_page=True)
        extra = os.environ.get("RELAY365_SCREENSHOTS")
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(extra) / path.name)

    def send(self, rcpt: str, subject: str, html: str | None = None) -> None:
        msg = EmailMessage()
        msg["From"] = "scanner@contoso.test"
        msg["To"] = rcpt
        msg["Subject"] = subject
        msg["Message-ID"] = f"<{subject.replace(' ', '.')}@mfp-3rd-floor>"
        msg.set_content(f"Scanned document: {subject}\n")
        if html is not None:
            msg.add_alternative(html, subtype="html")
            msg.add_attachment(b"%PDF-1.4 scan", maintype="application", subtype="pdf", filename="scan.pdf")
        with smtplib.SMTP("127.0.0.1", self.relay.ports["demo"], timeout=20) as s:
            s.send_message(msg)


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    state = tmp_path / "state"
    state.mkdir()
    async with Sandbox(example_tenant(), state_dir=state / "sandbox") as sb:
        settings = demo_settings(sb, state, port=0)
        slow = dataclasses.replace(settings.delivery, min_backoff=900, max_backoff=900, poll_interval=0.2)
        settings = dataclasses.replace(settings, delivery=slow)
        make_accounts(settings.server.spool_dir / "admin-users.json")
        relay = Relay(settings, mailboxes=SandboxMailboxes(sb.ctx.store, sorted(sb.ctx.tenant.mailboxes)))
        await relay.start()
        shots = tmp_path / "screenshots"
        shots.mkdir()
        try:
            yield Setup(relay, sb, relay.admin_url.rstrip("/"), shots, [])
        finally:
            await relay.stop(grace=5)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


async def open_page(browser: Browser, s: Setup) -> Page:
    context = await browser.new_context(viewport={"width": 1400, "height": 900})

    async def only_loopback(route: Route, request: Request) -> None:
        host = urllib.parse.urlsplit(request.url).hostname or ""
        if host in ("127.0.0.1", "localhost") or request.url.startswith(("data:", "about:")):
            await route.continue_()
        else:
            s.outside.append(request.url)
            await route.abort()

    await context.route("**/*", only_loopback)
    return await context.new_page()


async def log_in(page: Page, s: Setup, user: tuple[str, str]) -> None:
    await page.goto(s.url + "/queue")
    assert "/login" in page.url  # sent to the login page first
    await page.fill("input[name=username]", user[0])
    await page.fill("input[name=password]", user[1])
    await page.click("button[type=submit]")
    await page.wait_for_url(s.url + "/queue")


async def test_find_explain_retry_live_hold_release(setup: Setup, browser: Browser) -> None:
    s = setup
    s.sandbox.ctx.faults.add(Fault(endpoint="mx", stage="rcpt", reply=BUSY, times=1))
    await asyncio.to_thread(s.send, "alice@contoso.test", "Scan 0042 invoice")
    page = await open_page(browser, s)
    await log_in(page, s, OPERATOR)

    # Find the deferred message through the trace, by recipient.
    await page.goto(s.url + "/trace")
    await page.fill("input[name=recipient]", "alice@contoso.test")
    await page.click("form.filters button[type=submit]")
    deferred = page.locator("tr.ev-deferred")
    for _ in range(100):  # delivery runs in the background: search again until it has been tried
        if await deferred.count():
            break
        await asyncio.sleep(0.1)
        await page.reload()
    assert await deferred.count() == 1
    assert "Scan 0042 invoice" in await deferred.inner_text()
    await s.shot(page, "trace")

    # Its reply and what it means.
    await deferred.locator("a").first.click()
    await page.wait_for_selector("h1:has-text('Message')")
    row = page.locator("tr.rcpt-row")
    assert "451 4.7.500" in await row.inner_text()
    assert "Graylisting" in await row.locator(".explain").inner_text()
    await s.shot(page, "message")

    # The fault has cleared (it applied once): retry now, and watch it arrive without reloading.
    # The next attempt stalls a moment at MAIL, so the page is shown before the outcome is known.
    s.sandbox.ctx.faults.add(Fault(endpoint="mx", stage="mail", action="stall", stall_seconds=2.0, times=1))
    await page.click("button[value=retry]")
    await page.wait_for_url("**done=retry:1")
    assert await page.locator("tr.ev-delivered").count() == 0
    await page.evaluate("window.sameDocument = true")
    await page.wait_for_selector("tr.ev-delivered", timeout=20_000)
    # the queue state comes with the next live update (bounded wait: slower under a loaded machine)
    await page.wait_for_selector("main:has-text('Not in the queue any more')", timeout=20_000)
    assert await page.evaluate("window.sameDocument === true")  # updated in place, not reloaded
    assert [m.mailbox for m in s.sandbox.ctx.store.list("alice@contoso.test", "Inbox")] == [
        "alice@contoso.test"
    ]

    # Hold and release, from the queue page with a selection.
    s.sandbox.ctx.faults.add(Fault(endpoint="mx", stage="rcpt", reply=BUSY, times=1))
    await asyncio.to_thread(s.send, "bob@contoso.test", "Scan 0043 contract")
    await page.goto(s.url + "/queue?state=deferred")
    for _ in range(100):
        if "Scan 0043" in await page.inner_text("main"):
            break
        await asyncio.sleep(0.1)
        await page.reload()
    await page.check("input.pick")
    await page.click("button[value=hold]")
    await page.wait_for_url("**/queue?**done=hold:1")
    assert await page.locator("tr.held").count() == 1
    await s.shot(page, "queue")
    await page.goto(s.url + "/queue?state=held")
    await page.check("#select-all")
    await page.click("button[value=release]")
    await page.wait_for_url("**done=release:1")
    assert await page.locator("tr.held").count() == 0

    # Overview, devices, setup: shown, and in the screenshots.
    await page.goto(s.url + "/")
    assert "Upstreams" in await page.inner_text("main")
    assert await page.locator("text=direct-send").count() >= 1
    await s.shot(page, "overview")
    await page.goto(s.url + "/devices")
    assert "demo-device" in await page.inner_text("main")
    await s.shot(page, "devices")
    await page.goto(s.url + "/setup")
    assert "include:spf.protection.outlook.com" in await page.inner_text("main")
    await s.shot(page, "setup")
    assert s.outside == []


async def test_viewer_cannot_delete(setup: Setup, browser: Browser) -> None:
    s = setup
    s.sandbox.ctx.faults.add(Fault(endpoint="mx", stage="rcpt", reply=BUSY, times=1))
    await asyncio.to_thread(s.send, "alice@contoso.test", "Scan for the viewer")
    page = await open_page(browser, s)
    await log_in(page, s, VIEWER)
    for _ in range(100):
        if await page.locator("a[href^='/message/']").count():
            break
        await asyncio.sleep(0.1)
        await page.reload()
    await page.locator("a[href^='/message/']").first.click()
    await page.wait_for_selector("h1:has-text('Message')")
    assert await page.locator("button[value=delete]").count() == 0
    assert await page.locator("input.pick").count() == 0
    # Even a hand-made request with the session's CSRF token is refused.
    qid = page.url.rsplit("/", 1)[1]
    await page.goto(s.url + "/queue")
    csrf = await page.locator("input[name=csrf]").first.get_attribute("value")
    assert csrf
    r = await page.request.post(s.url + f"/api/queue/{qid}/delete", headers={"x-csrf-token": csrf})
    assert r.status == 403
    r = await page.request.post(s.url + "/queue/action", form={"action": "delete", "id": qid, "csrf": csrf})
    assert r.status == 403
    assert (await s.relay.spool.get(qid)).queue_id == qid


async def test_sandbox_mailbox_html_is_sandboxed(setup: Setup, browser: Browser) -> None:
    s = setup
    html = (
        "<html><body><h2 id='greeting'>Quarterly report</h2>"
        "<img src='http://tracker.example/pixel.gif'>"
        "<script>document.body.innerHTML = 'SCRIPT RAN'; parent.document.title = 'pwned';</script>"
        "<form action='http://phish.example/'><input name=p></form>"
        "</body></html>"
    )
    await asyncio.to_thread(s.send, "alice@contoso.test", "Report with HTML", html)
    page = await open_page(browser, s)
    await log_in(page, s, OPERATOR)
    await page.goto(s.url + "/mailboxes?mailbox=alice@contoso.test")
    link = page.locator("a:has-text('Report with HTML')")
    for _ in range(100):
        if await link.count():
            break
        await asyncio.sleep(0.1)
        await page.reload()
    await s.shot(page, "mailboxes")
    await link.click()
    await page.wait_for_selector("iframe.mailhtml")
    assert await page.get_attribute("iframe.mailhtml", "sandbox") == ""
    frame = page.frame_locator("iframe.mailhtml")
    assert await frame.locator("#greeting").inner_text() == "Quarterly report"
    assert "SCRIPT RAN" not in await frame.locator("body").inner_text()
    assert await page.title() != "pwned"
    assert "scan.pdf" in await page.inner_text("main")
    await s.shot(page, "mailbox-message")
    assert s.outside == []  # the tracking pixel was never requested
