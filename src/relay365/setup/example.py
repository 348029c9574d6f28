"""The documented example configuration, shipped in the package (``relay365 config example``)."""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable

EXAMPLE_NAME = "relay365.example.toml"


def example_config() -> Traversable:
    return files("relay365") / EXAMPLE_NAME


def example_config_text() -> str:
    return example_config().read_text(encoding="utf-8")
