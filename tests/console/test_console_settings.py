"""[admin] and [tracking] settings: defaults, and every bad value named with its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay365.errors import ConfigError
from tests.support import make_settings


def test_defaults(tmp_path: Path) -> None:
    s = make_settings(tmp_path)
    assert s.admin.port is None and s.admin.address == "127.0.0.1" and not s.admin.tls
    assert s.admin.open_metrics and s.admin.login_failures == 5 and s.admin.lockout_seconds == 900
    assert s.tracking.enabled and s.tracking.retention_days == 30 and s.tracking.path is None


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"admin": {"port": 70000}}, "admin.port"),
        ({"admin": {"address": "console.local"}}, "admin.address"),
        ({"admin": {"tls": "yes"}}, "admin.tls"),
        ({"admin": {"cert_file": "missing.pem"}}, "admin.cert_file"),
        ({"admin": {"allowed_hosts": [""]}}, "admin.allowed_hosts[0]"),
        ({"admin": {"login_failures": 0}}, "admin.login_failures"),
        ({"admin": {"session_hours": -1}}, "admin.session_hours"),
        ({"admin": {"colour": "blue"}}, "admin.colour"),
        ({"tracking": {"retention_days": 0}}, "tracking.retention_days"),
        ({"tracking": {"enabled": 1}}, "tracking.enabled"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, sections: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        make_settings(tmp_path, **sections)
    assert e.value.key == key


def test_cert_without_key(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="Set both cert_file and key_file"):
        make_settings(tmp_path, admin={"cert_file": str(cert)})
