"""``relay365 config check`` passes exactly when ``serve`` would start (issue 8, item 15).

Both run one preflight: secrets (env set, files 0600), token caches, certificate/key pairs, CA files,
port conflicts, the spool directory, and the transports built as serve builds them. The CLI tests run
both commands as subprocesses on the same file and compare what they print; the others call the
preflight directly.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from relay365.errors import PreflightError
from relay365.service.preflight import preflight_for
from relay365.settings import Settings
from tests.support import make_settings, run_cli, serving, smarthost_cfg, write_config

SECRET = "Upstream-s3cret-8812"
UNSET = "RELAY365_TEST_SURELY_UNSET"
M365 = {"tenant": "contoso.test", "client_id": "11111111-2222-3333-4444-555555555555"}


def error_text(stderr: str) -> str:
    """The error as printed (from 'error:' on), whitespace-normalised."""
    assert "error:" in stderr, stderr
    return " ".join(stderr[stderr.index("error:") :].split())


def secret_file(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "upstream.secret"
    path.write_text(SECRET + "\n")
    path.chmod(mode)
    return path


def token_cache(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text("{}")
    path.chmod(mode)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def other_key(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "other.key"
    ca.issue_cert("other.test").private_key_pem.write_to_path(str(path))
    return path


Case = Callable[[Path, trustme.CA, tuple[Path, Path]], tuple[dict[str, Any], str]]
CASES: dict[str, Case] = {
    "secret file 0644": lambda tmp, ca, pair: (
        {"transport": [smarthost_cfg(25, tls="required", username="u",
                                     password_file=str(secret_file(tmp, 0o644)))]},
        "transport[0].password: " + str(tmp / "upstream.secret")
        + " is readable by others (mode 644); run 'chmod 600' on it.",
    ),
    "env secret unset": lambda tmp, ca, pair: (
        {"transport": [smarthost_cfg(25, tls="required", username="u", password_env=UNSET)]},
        f"transport[0].password: environment variable {UNSET} is not set.",
    ),
    "key of another certificate": lambda tmp, ca, pair: (
        {"listener": [{"name": "lan", "port": 0, "cert_file": str(pair[0]),
                       "key_file": str(other_key(ca, tmp))}]},
        f"listener[0].cert_file: the private key in {tmp / 'other.key'} does not belong to the"
        f" certificate in {pair[0]}.",
    ),
    "token cache 0644": lambda tmp, ca, pair: (
        {"transport": [{"name": "m365", "type": "submission", "mailbox": "scan@contoso.test", **M365,
                        "token_cache": str(token_cache(tmp, 0o644))}]},
        f"transport[0].token_cache: {tmp / 'tokens.json'} holds a refresh token and is readable"
        " by others (mode 644); run 'chmod 600' on it.",
    ),
    "client CA that is no certificate": lambda tmp, ca, pair: (
        {"listener": [{"name": "lan", "port": 0, "client_ca_file": str(secret_file(tmp, 0o600))}]},
        f"listener[0].client_ca_file: {tmp / 'upstream.secret'} holds no PEM certificate.",
    ),
    "wildcard and loopback on one port": lambda tmp, ca, pair: (
        (port := free_port()) and {"listener": [
            {"name": "any", "address": "0.0.0.0", "port": port, "tls": "none"},
            {"name": "lo", "address": "127.0.0.1", "port": port, "tls": "none"}]},
        f"listener[0] (any) on 0.0.0.0:{port} and listener[1] (lo) on 127.0.0.1:{port} would bind"
        " the same port.",
    ),
    "spool under a file": lambda tmp, ca, pair: (
        (tmp / "a-file").write_text("x") and {"server": {"spool_dir": str(tmp / "a-file" / "spool")}},
        f"server.spool_dir: {tmp / 'a-file' / 'spool'} cannot be created: {tmp / 'a-file'} is not a"
        " directory.",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_fails_exactly_as_serve_does(
    tmp_path: Path, ca: trustme.CA, server_cert: tuple[Path, Path], case: str
) -> None:
    sections, expected = CASES[case](tmp_path, ca, server_cert)
    config = write_config(tmp_path, **sections)
    check = run_cli("config", "check", str(config))
    serve = run_cli("serve", "-c", str(config))
    assert check.returncode == 2, check.stdout + check.stderr
    assert serve.returncode == 2, serve.stdout + serve.stderr
    assert error_text(check.stderr) == error_text(serve.stderr)
    assert "Traceback" not in serve.stderr + check.stderr
    assert error_text(check.stderr) == f"error: relay365 cannot start: 1 problem(s): - {expected}"
    assert SECRET not in check.stdout + check.stderr + serve.stdout + serve.stderr


def test_good_config_passes_check_and_serve_starts(
    tmp_path: Path, server_cert: tuple[Path, Path], ca_file: Path
) -> None:
    cert, key = server_cert
    cache = token_cache(tmp_path, 0o600)
    key.chmod(0o600)
    config = write_config(
        tmp_path,
        listener=[
            {"name": "lan", "port": 0, "cert_file": str(cert), "key_file": str(key),
             "client_ca_file": str(ca_file)},
            {"name": "legacy", "port": 0, "tls": "implicit", "legacy": True, "min_tls_version": "1.0"},
        ],
        transport=[
            smarthost_cfg(25, tls="required", username="u", password_file=str(secret_file(tmp_path, 0o600)),
                          ca_file=str(ca_file)),
            smarthost_cfg(26, name="up2", tls="required", username="u", password_env="RELAY365_TEST_SECRET"),
            {"name": "m365", "type": "submission", "mailbox": "scan@contoso.test", **M365,
             "token_cache": str(cache)},
        ],
    )  # fmt: skip
    env = {"RELAY365_TEST_SECRET": "from-the-environment"}
    check = run_cli("config", "check", str(config), env=env)
    assert check.returncode == 0, check.stderr
    assert "ok" in check.stdout and "2 listener(s)" in check.stdout
    assert check.stderr == ""  # not even a warning
    assert not (tmp_path / "spool").exists()  # the check creates nothing
    with serving(config, tmp_path / "serve.log", env={**os.environ, **env}) as srv:
        assert set(srv.ports) == {"lan", "legacy"}
        assert srv.terminate() == 0
    assert "WARNING" not in srv.log_text()
    # Once serve has made the self-signed pairs, the check loads them too.
    assert run_cli("config", "check", str(config), env=env).returncode == 0


# -- the preflight on its own --------------------------------------------------------------------------
async def problems(settings: Settings) -> tuple[str, ...]:
    with pytest.raises(PreflightError) as e:
        await preflight_for(settings)
    return e.value.problems


async def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("not a certificate")
    settings = make_settings(
        tmp_path,
        transport=[
            smarthost_cfg(25, tls="required", username="u", password_env=UNSET, ca_file=str(bad_ca)),
            smarthost_cfg(26, name="b", client_key_file=str(bad_ca)),
        ],
        admin={"port": 9025},
        listener=[{"name": "lan", "address": "127.0.0.1", "port": 9025}],
    )
    found = await problems(settings)
    assert found == (
        f"transport[0].password: environment variable {UNSET} is not set.",
        f"transport[0].ca_file: {bad_ca} holds no PEM certificate.",
        "transport[1].client_key_file: a key without client_cert_file; give both.",
        "listener[0] (lan) on 127.0.0.1:9025 and admin on 127.0.0.1:9025 would bind the same port.",
    )


async def test_certificate_and_key_files(tmp_path: Path, ca: trustme.CA) -> None:
    leaf = ca.issue_cert("relay.test")
    cert, key, combined = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "both.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    private = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    combined.write_bytes(leaf.cert_chain_pems[0].bytes() + leaf.private_key_pem.bytes())
    combined.chmod(0o600)
    settings = make_settings(
        tmp_path,
        listener=[{"name": "lan", "port": 0, "cert_file": str(cert), "key_file": str(key)}],
        transport=[
            smarthost_cfg(25, client_cert_file=str(cert)),  # no key anywhere
            smarthost_cfg(26, name="b", client_cert_file=str(combined)),  # cert + key in one file: fine
            {"name": "g", "type": "graph", "mailbox": "scan@contoso.test", **M365,
             "certificate_file": str(cert)},
        ],
    )  # fmt: skip
    assert await problems(settings) == (
        f"transport[0].client_cert_file: {cert} holds no PEM private key (give the key in its own"
        " file or append it to this one).",
        f"transport[2].certificate_file: {cert} holds no PEM private key (give the key in its own"
        " file or append it to this one).",
        f"listener[0].cert_file: the private key in {key} is encrypted; relay365 cannot ask for a"
        " passphrase: store it unencrypted (mode 0600).",
    )


async def test_warnings_do_not_stop_serve(tmp_path: Path, ca: trustme.CA) -> None:
    old = ca.issue_cert(
        "relay.test",
        not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
        not_after=datetime.datetime(2021, 1, 1, tzinfo=datetime.UTC),
    )
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    old.cert_chain_pems[0].write_to_path(str(cert))
    old.private_key_pem.write_to_path(str(key))
    key.chmod(0o644)
    settings = make_settings(
        tmp_path,
        listener=[
            {"name": "old", "port": 0, "tls": "implicit", "legacy": True, "min_tls_version": "1.0",
             "cert_file": str(cert), "key_file": str(key)}
        ],
        transport=[{"name": "m365", "type": "graph", "mailbox": "scan@contoso.test", **M365,
                    "token_cache": str(tmp_path / "tokens.json")}],
    )  # fmt: skip
    report = await preflight_for(settings)
    try:
        assert [w.split(":")[0] for w in report.warnings] == [
            "transport[0].token_cache",  # delegated, 'relay365 login' not run yet
            "listener[0].cert_file",  # world-readable key
            "listener[0].cert_file",  # expired
            "listener[0] (old)",  # legacy but ECDSA
        ]
        assert "run 'relay365 login m365'" in report.warnings[0]
        assert "readable by every user (mode 644)" in report.warnings[1]
        assert "expired on 2021-01-01" in report.warnings[2]
        assert "only RSA key exchange" in report.warnings[3]
        assert set(report.transports) == {"m365"}  # built once, serve takes them over
    finally:
        await report.close()


async def test_delegated_oauth_needs_a_token_cache(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, transport=[{"name": "m365", "type": "submission", "mailbox": "a@contoso.test", **M365}]
    )
    [problem] = await problems(settings)
    assert problem.startswith("transport[0] (m365): OAuth needs client_secret_env/client_secret_file")


async def test_addresses_that_overlap(tmp_path: Path) -> None:
    def listeners(*pairs: tuple[str, int]) -> Settings:
        return make_settings(
            tmp_path,
            listener=[
                {"name": f"l{i}", "address": a, "port": p, "tls": "none"} for i, (a, p) in enumerate(pairs)
            ],
        )

    port = free_port()
    for pair in ((("::", port), ("::1", port)), (("0.0.0.0", port), ("127.0.0.9", port))):
        [problem] = await problems(listeners(*pair))
        assert "would bind the same port" in problem
    fine = [
        (("127.0.0.1", port), ("127.0.0.2", port)),  # different addresses
        (("0.0.0.0", port), ("::", port)),  # different families (IPv6 sockets are V6ONLY)
        (("127.0.0.1", 0), ("127.0.0.1", 0)),  # kernel-chosen ports never collide
    ]
    for pair in fine:
        report = await preflight_for(listeners(*pair))
        assert report.warnings == []


async def test_spool_and_self_signed_files(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (spool / "queue.db").mkdir(parents=True)  # something that cannot be opened as the queue
    [problem] = await problems(make_settings(tmp_path))
    assert problem.startswith(f"server.spool_dir: cannot open the queue {spool / 'queue.db'} for writing")
    (spool / "queue.db").rmdir()
    (spool / "tls").mkdir()
    (spool / "tls" / "selfsigned.crt").write_text("garbage")
    (spool / "tls" / "selfsigned.key").write_text("garbage")
    [problem] = await problems(make_settings(tmp_path))
    assert problem == (
        f"listener[0] (lan) self-signed certificate: {spool / 'tls' / 'selfsigned.crt'} holds no PEM"
        " certificate."
    )
