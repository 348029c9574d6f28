"""`relay365 login`: the device code flow once, then the refresh token renews itself unattended."""

from __future__ import annotations

import asyncio
import re
import ssl
import stat
from pathlib import Path

import httpx

from relay365.oauth import SMTP_SCOPE, token_source
from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import example_tenant
from relay365.settings import parse_settings
from tests.support import make_settings, running_relay
from tests.support.m365 import send, wait_until

PUBLIC_APP = "66666666-7777-8888-9999-000000000000"


async def test_device_code_login_then_unattended_refresh(tmp_path: Path) -> None:
    async with Sandbox(
        example_tenant(), state_dir=tmp_path / "sb", http_app_options={"device_code_interval": 1}
    ) as sb:
        cache = tmp_path / "token-cache.json"
        transport = {
            "name": "submission",
            "type": "submission",
            "host": "127.0.0.1",
            "port": sb.submission_port,
            "ca_file": str(sb.ca_path),
            "mailbox": "scanner@contoso.test",
            "tenant": sb.ctx.tenant.tenant_id,
            "client_id": PUBLIC_APP,
            "authority": sb.base_url,
            "authority_ca_file": str(sb.ca_path),
            "token_cache": str(cache),
        }
        settings = parse_settings({"transport": [transport]}, base=tmp_path)
        source = token_source(settings.transports[0], scope=SMTP_SCOPE)
        assert source.delegated
        codes: asyncio.Queue[str] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def prompt(text: str) -> None:
            m = re.search(r"enter the code (\S+)", text)
            assert m, text
            loop.call_soon_threadsafe(codes.put_nowait, m.group(1))

        login = asyncio.create_task(asyncio.to_thread(source.login_device_flow, prompt))
        user_code = await asyncio.wait_for(codes.get(), 20)
        ctx = ssl.create_default_context(cafile=str(sb.ca_path))
        async with httpx.AsyncClient(verify=ctx, trust_env=False) as client:
            r = await client.post(
                f"{sb.base_url}/_sandbox/devicecode/approve",
                json={
                    "user_code": user_code,
                    "address": "scanner@contoso.test",
                    "password": "Scanner-Passw0rd!",
                },
            )
            assert r.status_code == 200, r.text
        assert (await asyncio.wait_for(login, 30)).lower() == "scanner@contoso.test"
        source.close()
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600
        assert "refresh_token" in cache.read_text().lower() or "RefreshToken" in cache.read_text()

        # Months later, unattended: a new process (new TokenSource) refreshes from the cache and sends.
        relay_settings = make_settings(tmp_path / "relay", transport=[transport])
        async with running_relay(relay_settings) as relay:
            await send(relay, "scanner@contoso.test", ["alice@contoso.test"], b"Subject: d\r\n\r\nx\r\n")
            await wait_until(lambda: len(sb.ctx.store.list(mailbox="alice@contoso.test")) == 1)
            [msg] = sb.ctx.store.list(mailbox="alice@contoso.test")
            assert msg.authenticated_as == f"scanner@contoso.test (XOAUTH2 app {PUBLIC_APP})"
