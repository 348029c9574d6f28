"""Helpers for the console tests: accounts in a users file, a relay with its console on port 0, and
logged-in HTTP clients (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from relay365.admin.accounts import AccountStore, Role
from relay365.service.relay import Relay
from tests.support import make_settings, running_relay

OPERATOR = ("olga", "operator-pass-1")
VIEWER = ("victor", "viewer-pass-1")
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Console:
    relay: Relay
    base: str
    token: str  # an operator API token
    viewer_token: str

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base, trust_env=False, timeout=20, verify=False, **kwargs)


def make_accounts(path: Path) -> tuple[str, str]:
    store = AccountStore(path)
    store.set_password(OPERATOR[0], OPERATOR[1], Role.OPERATOR)
    store.set_password(VIEWER[0], VIEWER[1], Role.VIEWER)
    return store.create_token("automation", Role.OPERATOR), store.create_token("grafana", Role.VIEWER)


def console_settings(tmp_path: Path, **sections: Any) -> Any:
    admin = {"port": 0, **sections.pop("admin", {})}
    return make_settings(tmp_path, admin=admin, **sections)


@contextlib.asynccontextmanager
async def running_console(tmp_path: Path, **sections: Any) -> AsyncIterator[Console]:
    token, viewer_token = make_accounts(tmp_path / "spool" / "admin-users.json")
    relay_kwargs = sections.pop("relay_kwargs", {})
    async with running_relay(console_settings(tmp_path, **sections), **relay_kwargs) as relay:
        yield Console(relay, relay.admin_url.rstrip("/"), token, viewer_token)


async def login(http: httpx.AsyncClient, user: tuple[str, str]) -> str:
    """Log in through the form; return the session's CSRF token (read from a page, as a browser)."""
    r = await http.post("/login", data={"username": user[0], "password": user[1], "next": "/"})
    assert r.status_code == 303, r.text
    page = await http.get("/queue")
    m = _CSRF.search(page.text)
    assert m is not None, page.text
    return m.group(1)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def wait_for(check: Any, timeout: float = 15.0, what: str = "") -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
