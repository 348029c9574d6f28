"""relay365.toml: every error names the key and the bad value; secrets never sit in the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from relay365.credentials import Redactor, hash_password, load_secret, verify_password
from relay365.errors import ConfigError, SecretError
from relay365.settings import SecretRef, load_settings, parse_settings


def parse(tmp_path: Path, data: dict[str, Any]) -> Any:
    return parse_settings(data, base=tmp_path)


@pytest.mark.parametrize(
    ("data", "key", "value"),
    [
        ({"listener": [{"port": 70000}]}, "listener[0].port", 70000),
        ({"listener": [{"tls": "maybe"}]}, "listener[0].tls", "maybe"),
        ({"listener": [{"min_tls_version": "1.0"}]}, "listener[0].min_tls_version", "1.0"),
        ({"listener": [{"address": "printer"}]}, "listener[0].address", "printer"),
        (
            {"listener": [{"cert_file": "/nonexistent.pem", "key_file": "/x"}]},
            "listener[0].cert_file",
            "/nonexistent.pem",
        ),
        ({"device": [{"name": "p", "ip_allow": ["10.0.0.0/33"]}]}, "device[0].ip_allow", "10.0.0.0/33"),
        ({"device": [{"name": "p", "password_hash": "plain"}]}, "device[0].password_hash", "***"),
        (
            {"device": [{"name": "p", "allowed_senders": ["nodomain"]}]},
            "device[0].allowed_senders",
            "nodomain",
        ),
        ({"device": [{"ip_allow": []}]}, "device[0].name", ""),
        ({"delivery": {"min_backoff": -1}}, "delivery.min_backoff", -1.0),
        ({"delivery": {"concurrency": "ten"}}, "delivery.concurrency", "ten"),
        ({"server": {"colour": "blue"}}, "server.colour", "blue"),
        ({"server": {"log_format": "xml"}}, "server.log_format", "xml"),
        (
            {"transport": [{"name": "t", "password": "hunter2", "username": "u"}]},
            "transport[0].password",
            "***",
        ),
        ({"transport": [{"name": "t"}], "route": [{"transport": "nope"}]}, "route[0].transport", "nope"),
        ({"admin": {"port": 70000}}, "admin.port", 70000),
        ({"admin": {"address": "localhost", "port": 9025}}, "admin.address", "localhost"),
        ({"admin": {"metrics": True}}, "admin.metrics", True),
    ],
)
def test_errors_name_key_and_value(tmp_path: Path, data: dict[str, Any], key: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        parse(tmp_path, data)
    assert err.value.key == key and err.value.value == value
    assert f"Config '{key}' has value {value!r}." in str(err.value)
    assert "hunter2" not in str(err.value)


def test_example_config_is_valid() -> None:
    settings = load_settings(Path(__file__).parents[2] / "relay365.example.toml")
    assert settings.listeners and settings.devices and settings.transports


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "relay365.toml"
    f.write_text("[server\n")
    with pytest.raises(ConfigError, match="Not valid TOML"):
        load_settings(f)


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    s = parse(tmp_path, {"server": {"spool_dir": "spool"}})
    assert s.server.spool_dir == tmp_path / "spool"


def test_secret_sources(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text("s3cret-from-file\n")
    os.chmod(f, 0o600)
    assert load_secret(SecretRef("t.password", file=f)) == "s3cret-from-file"
    os.chmod(f, 0o644)
    with pytest.raises(SecretError, match="chmod 600") as err:
        load_secret(SecretRef("t.password", file=f))
    assert "s3cret" not in str(err.value)
    assert load_secret(SecretRef("t.password", env="RELAY_PW"), {"RELAY_PW": "from-env"}) == "from-env"
    with pytest.raises(SecretError, match="RELAY_PW is not set"):
        load_secret(SecretRef("t.password", env="RELAY_PW"), {})


def test_argon2id_hashes() -> None:
    h = hash_password("correct horse")
    assert h.startswith("$argon2id$")
    assert verify_password(h, "correct horse") and not verify_password(h, "wrong")
    assert not verify_password(None, "anything")


def test_redactor_masks_secrets_and_auth_material() -> None:
    r = Redactor(["hunter2-secret"])
    text = r.redact(
        "login with hunter2-secret; AUTH PLAIN AGZvbwBiYXI=; auth login dXNlcg==;"
        " Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln; password=abc123"
    )
    for secret in ("hunter2-secret", "AGZvbwBiYXI=", "dXNlcg==", "eyJhbGciOiJSUzI1NiJ9", "abc123"):
        assert secret not in text
