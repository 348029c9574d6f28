"""``relay365 init`` writes a config that ``relay365 config check`` accepts, with no secret in it, from
flags alone (``--non-interactive``) or from answers typed at its prompts (the advisor's questions
included); it never overwrites without ``--force``. ``relay365 config example`` prints the shipped
example."""

from __future__ import annotations

import base64
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest

from relay365.credentials import verify_password
from relay365.setup.example import example_config_text
from relay365.setup.init import default_spool
from tests.support import run_cli

CLIENT_ID = "11111111-2222-3333-4444-555555555555"
PASSWORDS = ("Mfp-pw-4471-Lq", "Erp-pw-8820-Zt")

COMMON = (
    "--non-interactive",
    "--domain",
    "contoso.com",
    "--domain",
    "fabrikam.com",
    "--hostname",
    "relay.lan",
)
OAUTH = ("--client-id", CLIENT_ID, "--mailbox", "scanner@contoso.com")
DEVICES = ("--device-ip", "192.168.1.0/24", "--device-ip", "10.0.0.7", "--device-login", "mfp",
           "--device-login", "erp", "--device-password-stdin")  # fmt: skip


def init(out: Path, *args: str, stdin: str | None = None) -> Any:
    return run_cli("init", "--output", str(out), *args, stdin=stdin)


# Where init says the secrets go; `config check` runs serve's preflight, which reads them.
SECRET_ENV = {"RELAY365_CLIENT_SECRET": "App-s3cret-1181-Wx", "RELAY365_SMARTHOST_PASSWORD": "Sm-pw-2290-Qa"}


def checked(out: Path) -> dict[str, Any]:
    r = run_cli("config", "check", str(out), env=SECRET_ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok ")
    return tomllib.loads(out.read_text())


def assert_no_secret(text: str) -> None:
    for pw in PASSWORDS:
        for form in (pw, base64.b64encode(pw.encode()).decode()):
            assert form not in text
    assert not re.search(r"^\s*(client_secret|password)\s*=", text, re.M)


@pytest.mark.parametrize(
    ("option", "extra"),
    [
        ("submission", OAUTH),
        ("graph", (*OAUTH, "--tenant", "8f1c2d3e-4b5a-4c6d-9e7f-0a1b2c3d4e5f", "--client-secret-file",
                   "{tmp}/client-secret")),
        ("direct_send", ()),
        ("connector", ()),
    ],
)  # fmt: skip
def test_init_from_flags_passes_config_check(tmp_path: Path, option: str, extra: tuple[str, ...]) -> None:
    out = tmp_path / "relay365.toml"
    extra = tuple(x.format(tmp=tmp_path) for x in extra)
    r = init(out, "--transport", option, *COMMON, *extra, *DEVICES, stdin="\n".join(PASSWORDS) + "\n")
    assert r.returncode == 0, r.stderr
    secret_file = tmp_path / "client-secret"  # where init said (graph): the secret alone, mode 0600
    secret_file.write_text(SECRET_ENV["RELAY365_CLIENT_SECRET"] + "\n")
    secret_file.chmod(0o600)
    text = out.read_text()
    assert_no_secret(text + r.stdout + r.stderr)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    data = checked(out)
    assert data["server"] == {"hostname": "relay.lan", "spool_dir": "var/spool"}
    [transport] = data["transport"]
    assert transport["type"] == option
    by_address, mfp, erp = data["device"]
    assert by_address["ip_allow"] == ["192.168.1.0/24", "10.0.0.7"] and "password_hash" not in by_address
    assert (mfp["name"], erp["name"]) == ("mfp", "erp")
    assert verify_password(mfp["password_hash"], PASSWORDS[0])
    assert verify_password(erp["password_hash"], PASSWORDS[1])
    assert not verify_password(mfp["password_hash"], PASSWORDS[1])
    [route] = data["route"]
    said = " ".join(r.stderr.split())
    if option in ("submission", "graph"):
        assert transport["mailbox"] == "scanner@contoso.com" and transport["client_id"] == CLIENT_ID
        assert mfp["rewrite_sender"] == "scanner@contoso.com"
        assert "recipient_domains" not in route
    else:
        assert transport["accepted_domains"] == ["contoso.com", "fabrikam.com"]
        assert mfp["allowed_senders"] == ["@contoso.com", "@fabrikam.com"]
    if option == "submission":
        assert transport["tenant"] == "contoso.com"
        assert transport["client_secret_env"] == "RELAY365_CLIENT_SECRET"
        assert "a line RELAY365_CLIENT_SECRET=... in /etc/relay365/env (chmod 600" in said
        assert "# - The app's client secret goes into the environment variable RELAY365_CLIENT_SECRET" in text
    if option == "graph":
        assert transport["client_secret_file"] == str(secret_file)
        assert f"The app's client secret goes into {secret_file}: the secret alone, chmod 600" in said
    if option == "direct_send":
        assert route["recipient_domains"] == ["contoso.com", "fabrikam.com"]
    assert "stored as Argon2id hashes only" in said


def test_init_asks_the_advisor_questions(tmp_path: Path) -> None:
    """Typed answers: the advisor picks relay365 -> submission for a port-465-only device without TLS 1.2
    or OAuth, and the listener follows (implicit TLS on 465, legacy TLS)."""
    out = tmp_path / "relay365.toml"
    answers = [
        "contoso.com",  # accepted domain(s)
        "",  # delivery option: advise (the default)
        "y", "n", "n", "y", "n", "n", "n", "n", "n",  # the advisor's yes/no questions, in its order
        "200", "300",  # messages and recipients per day
        "",  # tenant: the domain (default)
        CLIENT_ID,
        "scanner@contoso.com",
        "",  # client secret: RELAY365_CLIENT_SECRET (default)
        "192.168.7.0/24",  # devices by address
        "mfp",  # devices with a login
        PASSWORDS[0],  # its password (stdin is not a terminal: one line)
    ]  # fmt: skip
    r = init(out, "--hostname", "relay.lan", stdin="\n".join(answers) + "\n")
    assert r.returncode == 0, r.stderr
    said = " ".join(r.stderr.split())
    assert "Recommended: Option 1: SMTP AUTH client submission" in said
    assert "Must mail reach recipients outside your organization?" in said
    data = checked(out)
    [listener] = data["listener"]
    assert (listener["port"], listener["tls"], listener["legacy"], listener["min_tls_version"]) == (
        465, "implicit", True, "1.0",
    )  # fmt: skip
    assert data["transport"][0]["type"] == "submission"
    assert verify_password(data["device"][1]["password_hash"], PASSWORDS[0])
    assert_no_secret(out.read_text())


def test_init_with_advisor_answers_file_runs_unattended(tmp_path: Path) -> None:
    answers = tmp_path / "answers.json"
    answers.write_text(
        '{"external_recipients": false, "tls12": true, "oauth": false, "port465_only": false,'
        ' "smtp_auth_disabled": true, "reject_direct_send": false, "static_ip": true}'
    )
    out = tmp_path / "relay365.toml"
    r = init(out, "--answers", str(answers), *COMMON, "--device-ip", "10.1.0.0/16")
    assert r.returncode == 0, r.stderr
    data = checked(out)
    assert data["transport"][0]["type"] == "direct_send"  # internal only, SMTP AUTH off
    assert data["route"][0]["recipient_domains"] == ["contoso.com", "fabrikam.com"]


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("--transport", "submission", "--domain", "contoso.com", "--device-ip", "10.0.0.1",
          "--mailbox", "a@contoso.com"), "missing answer: --client-id"),
        (("--transport", "direct_send", "--domain", "contoso.com"),
         "missing answer: --device-ip or --device-login"),
        (("--transport", "graph", "--domain", "contoso.com", "--device-ip", "10.0.0.1", "--mailbox",
          "a@contoso.com", "--client-id", "not-a-guid"), "'--client-id' has value 'not-a-guid'"),
        (("--transport", "direct_send", "--domain", "contoso.com", "--device-ip", "10.0.0.300"),
         "'--device-ip' has value '10.0.0.300'"),
        (("--transport", "direct_send", "--domain", "contoso", "--device-ip", "10.0.0.1"),
         "'--domain' has value 'contoso'"),
        (("--transport", "postfix", "--domain", "contoso.com"), "--transport 'postfix'"),
        (("--domain", "contoso.com", "--device-ip", "10.0.0.1"), "missing answer: --transport"),
        (("--transport", "direct_send", "--domain", "contoso.com", "--device-login", "mfp"),
         "no password for device mfp"),
    ],
)  # fmt: skip
def test_init_names_the_bad_or_missing_answer(tmp_path: Path, args: tuple[str, ...], complaint: str) -> None:
    out = tmp_path / "relay365.toml"
    r = init(out, "--non-interactive", *args, stdin="")
    assert r.returncode == 2
    assert complaint in " ".join(r.stderr.split()), r.stderr
    assert not out.exists()


def test_init_never_overwrites_without_force(tmp_path: Path) -> None:
    out = tmp_path / "relay365.toml"
    out.write_text("# mine\n")
    root = os.geteuid() == 0
    if root:
        os.chown(out, 0, 4321)  # shared with the service's group by `relay365 service install`
    args = ("--transport", "direct_send", *COMMON, "--device-ip", "10.0.0.1")
    r = init(out, *args)
    assert r.returncode == 2 and "exists" in r.stderr and "--force" in " ".join(r.stderr.split())
    assert out.read_text() == "# mine\n"
    r = init(out, *args, "--force")
    assert r.returncode == 0, r.stderr
    checked(out)
    # Replaced, not rewritten in place: same owner and group, so the service can still read it.
    assert (out.stat().st_uid, out.stat().st_gid) == ((0, 4321) if root else (os.geteuid(), os.getegid()))
    assert not list(tmp_path.glob(".relay365.toml.*"))  # no temporary file left


def test_service_config_spools_in_the_state_directory() -> None:
    assert default_spool(Path("/etc/relay365/relay365.toml")) == "/var/lib/relay365/spool"
    assert default_spool(Path("relay365.toml")) == "var/spool"


@pytest.mark.slow
def test_config_example_prints_and_writes_the_shipped_file(tmp_path: Path) -> None:
    r = run_cli("config", "example")
    assert r.returncode == 0 and r.stdout == example_config_text()
    assert "[[listener]]" in r.stdout and "[[transport]]" in r.stdout
    out = tmp_path / "relay365.toml"
    r = run_cli("config", "example", "--output", str(out))
    assert r.returncode == 0, r.stderr
    # As an admin would: the secrets it names set, the folders its token caches go into made.
    (tmp_path / "var").mkdir()
    secrets = {
        name: "Example-s3cret-0001" for name in re.findall(r'_env\s*=\s*"(\w+)"', r.stdout + out.read_text())
    }
    check = run_cli("config", "check", str(out), env=secrets)
    assert check.returncode == 0 and check.stdout.startswith("ok "), check.stderr
    out.write_text("# edited\n")
    r = run_cli("config", "example", "--output", str(out))
    assert r.returncode == 2 and out.read_text() == "# edited\n"
