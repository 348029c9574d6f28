"""A running sandbox tenant for the Microsoft 365 tests (the settings that route into it:
tests/support/m365.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay365.sandbox.runner import Sandbox
from relay365.sandbox.tenant import example_tenant
from tests.support import APP_SECRET, SECRET_ENV


@pytest.fixture
async def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Sandbox]:
    monkeypatch.setenv(SECRET_ENV, APP_SECRET)
    async with Sandbox(example_tenant(), state_dir=tmp_path / "sandbox") as sb:
        yield sb
