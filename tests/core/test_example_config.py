"""relay365.example.toml documents every key of the settings model, every transport type, and ships."""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from pathlib import Path

from relay365.diagnostics.sendas import send_as_risks
from relay365.settings import (
    AdminSettings,
    DeliverySettings,
    DeviceSettings,
    ListenerSettings,
    M365Options,
    RouteSettings,
    SecretRef,
    ServerSettings,
    TracingSettings,
    TransportSettings,
    load_settings,
)

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "relay365.example.toml"
# The table each settings class is read from, and its TOML keys (a SecretRef is `<key>_env`/`_file`).
TABLES = {
    "[server]": ServerSettings,
    "[[listener]]": ListenerSettings,
    "[[device]]": DeviceSettings,
    "[delivery]": DeliverySettings,
    "[admin]": AdminSettings,
    "[tracing]": TracingSettings,
    "[[transport]]": TransportSettings,
    "[[route]]": RouteSettings,
}


def model_keys(cls: type) -> set[str]:
    keys: set[str] = set()
    for f in dataclasses.fields(cls):
        if f.name == "m365":  # M365Options' keys sit in the [[transport]] table itself
            keys |= model_keys(M365Options)
        elif SecretRef.__name__ in str(f.type):
            keys |= {f"{f.name}_env", f"{f.name}_file"}
        else:
            keys.add(f.name)
    return keys


def documented(text: str) -> dict[str, set[str]]:
    """Keys per table, active or shown commented out (``# key = value``)."""
    found: dict[str, set[str]] = {}
    table = ""
    for line in text.splitlines():
        header = re.match(r"^#?\s*(\[\[?[a-z_]+\]\]?)\s*$", line)
        if header:
            table = header.group(1)
            continue
        for key in re.findall(r"(?:^|#\s*|\bor\s+)([a-z_]+)\s*=", line):
            found.setdefault(table, set()).add(key)
    return found


def test_every_key_of_the_settings_model_is_documented() -> None:
    found = documented(EXAMPLE.read_text())
    for table, cls in TABLES.items():
        missing = model_keys(cls) - found.get(table, set())
        assert not missing, f"{table}: {sorted(missing)} not in relay365.example.toml"


def test_every_transport_type_and_credential_form_is_shown() -> None:
    text = EXAMPLE.read_text()
    blocks = re.split(r"^#?\s*\[\[transport\]\]\s*$", text, flags=re.MULTILINE)[1:]
    kinds = {re.search(r'type = "([a-z_]+)"', b).group(1): b for b in blocks if 'type = "' in b}  # type: ignore[union-attr]
    assert set(kinds) == {"submission", "direct_send", "connector", "graph", "smarthost"}
    submissions = [b for b in blocks if 'type = "submission"' in b]
    assert any("client_secret_env" in b for b in submissions)  # secret
    assert any("certificate_file" in b for b in submissions)  # certificate
    assert any("token_cache" in b for b in submissions)  # delegated sign-in
    assert "client_cert_file" in kinds["connector"] and "client_key_file" in kinds["connector"]


def test_readme_keys_are_in_the_example() -> None:
    readme = (ROOT / "README.md").read_text()
    model = set().union(*(model_keys(c) for c in TABLES.values()))
    mentioned = {k for k in re.findall(r"`([a-z_]+)(?: =[^`]*)?`", readme) if k in model}
    assert len(mentioned) >= 20
    found = set().union(*documented(EXAMPLE.read_text()).values())
    assert mentioned <= found, sorted(mentioned - found)


def test_the_example_is_valid_warning_free_and_shipped() -> None:
    settings = load_settings(EXAMPLE)
    assert len(settings.transports) >= 6 and settings.routes
    assert send_as_risks(settings) == []  # every mailbox transport sends as the device's sender
    shipped = resources.files("relay365").joinpath("relay365.example.toml").read_text(encoding="utf-8")
    assert shipped == EXAMPLE.read_text(encoding="utf-8")
