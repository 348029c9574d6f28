"""Shared fixtures of the sandbox tests: a running sandbox on the test's event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from relay365.sandbox.runner import Sandbox
from tests.sandbox.sandbox_helpers import make_tenant


@pytest.fixture
async def start_sandbox(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await start_sandbox(**tenant_changes)``: a running sandbox (SMTP only), closed after the test."""
    running: list[Sandbox] = []

    async def start(*, serve_http: bool = False, **changes: Any) -> Sandbox:
        sandbox = Sandbox(
            make_tenant(**changes), state_dir=tmp_path / f"state{len(running)}", serve_http=serve_http
        )
        await sandbox.__aenter__()
        running.append(sandbox)
        return sandbox

    yield start
    for sandbox in running:
        await sandbox.close()


@pytest.fixture
async def sandbox(start_sandbox: Callable[..., Any]) -> Sandbox:
    result: Sandbox = await start_sandbox()
    return result
