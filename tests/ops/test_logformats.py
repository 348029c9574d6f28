"""Log formats: ``journal`` lines (sd-daemon(3) ``<N>`` priorities, no timestamps), ``json`` objects with
the event's fields, ``auto`` following ``JOURNAL_STREAM``; secrets redacted in each (the whole-relay grep
is tests/core/test_secrets.py)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from relay365.credentials import Redactor
from relay365.logformats import (
    JournalFormatter,
    JsonFormatter,
    is_journal_stream,
    make_formatter,
    syslog_priority,
)
from tests.support import RELAY365, closed_port, run_cli, smarthost_cfg, write_config

SECRET = "Cl13nt-s3cret-9931-Rw"


@contextmanager
def capture(formatter: logging.Formatter, redactor: Redactor) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger with one handler as ``configure_logging`` builds it (formatter + redacting filter)."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(formatter)
    handler.addFilter(redactor)
    logger = logging.getLogger(f"relay365.test.{id(buf)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield logger, buf
    finally:
        logger.removeHandler(handler)


def test_syslog_priorities_follow_sd_daemon() -> None:
    levels = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL]
    assert [syslog_priority(level) for level in levels] == [7, 6, 4, 3, 2]


def test_journal_lines_have_a_priority_and_no_timestamp() -> None:
    with capture(JournalFormatter(), Redactor([SECRET])) as (log, buf):
        log.debug("probe")
        log.info("queued %s peer=%s", "0195A2B3C4D5E6F708A", "10.0.0.5")
        log.warning("upstream said password=%s", SECRET)
        try:
            raise ValueError(f"token {SECRET} refused")
        except ValueError:
            log.exception("delivery failed")
    lines = buf.getvalue().splitlines()
    name = log.name
    assert lines[:3] == [
        f"<7>{name}: probe",
        f"<6>{name}: queued 0195A2B3C4D5E6F708A peer=10.0.0.5",
        f"<4>{name}: upstream said password=***",
    ]
    # The traceback belongs to the error entry: every line carries <3>, so journalctl -p err shows it.
    assert lines[3] == f"<3>{name}: delivery failed"
    assert lines[4] == "<3>Traceback (most recent call last):"
    assert all(line.startswith("<3>") for line in lines[3:]) and "ValueError" in lines[-1]
    assert SECRET not in buf.getvalue()


def test_json_lines_carry_the_event_fields_redacted() -> None:
    redactor = Redactor([SECRET])
    with capture(JsonFormatter(redact=redactor.redact), redactor) as (log, buf):
        log.info(
            "queued %s from=<%s> nrcpt=%d size=%d device=%s peer=%s listener=%s",
            "0195A2B3C4D5E6F708A", "scanner@contoso.com", 2, 4096, "mfp", "10.0.0.5", "lan",
        )  # fmt: skip
        log.info(
            "%s to=<%s> via=%s outcome=%s reply=%r",
            "0195A2B3C4D5E6F708A", "bob@contoso.com", "m365", "delivered", "250 2.6.0 Queued",
        )  # fmt: skip
        log.warning("login refused", extra={"peer": "10.0.0.9", "user": f"secret={SECRET}"})
        try:
            raise RuntimeError(f"Bearer {SECRET}")
        except RuntimeError:
            log.exception("token endpoint failed for %s", SECRET)
    records = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert SECRET not in buf.getvalue()
    queued, delivered, refused, failed = records
    assert set(queued) >= {"time", "level", "logger", "message"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", queued["time"])
    assert queued["level"] == "INFO" and queued["logger"] == log.name
    assert {k: queued[k] for k in ("queue_id", "from", "nrcpt", "size", "device", "peer", "listener")} == {
        "queue_id": "0195A2B3C4D5E6F708A", "from": "scanner@contoso.com", "nrcpt": 2, "size": 4096,
        "device": "mfp", "peer": "10.0.0.5", "listener": "lan",
    }  # fmt: skip
    assert (delivered["queue_id"], delivered["to"], delivered["via"], delivered["outcome"]) == (
        "0195A2B3C4D5E6F708A", "bob@contoso.com", "m365", "delivered",
    )  # fmt: skip
    assert delivered["reply"] == "250 2.6.0 Queued"
    assert refused["peer"] == "10.0.0.9" and refused["user"] == "secret=***"
    assert failed["level"] == "ERROR" and failed["message"] == "token endpoint failed for ***"
    assert "RuntimeError: Bearer ***" in failed["exc"]


def test_json_under_the_journal_gets_the_priority_prefix(tmp_path: Path) -> None:
    with (tmp_path / "stderr").open("w") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert is_journal_stream(stream, env)
        assert not is_journal_stream(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not is_journal_stream(stream, {"JOURNAL_STREAM": "nonsense"})
        formatter = make_formatter("json", stream=stream, redact=str, environ=env)
        assert isinstance(formatter, JsonFormatter)
        with capture(formatter, Redactor()) as (log, buf):
            log.error("spool refused message peer=%s", "10.0.0.5")
        line = buf.getvalue().strip()
        assert line.startswith("<3>{")
        assert json.loads(line[3:])["peer"] == "10.0.0.5"
        assert isinstance(make_formatter("auto", stream=stream, redact=str, environ=env), JournalFormatter)
        assert type(make_formatter("auto", stream=stream, redact=str, environ={})) is logging.Formatter


def serve_log(tmp_path: Path, name: str, *args: str, journal: bool = False, **server: str) -> list[str]:
    """``relay365 serve`` with stderr to a file (named as the journal's stream if ``journal``), started
    and stopped; its stderr lines."""
    config = write_config(
        tmp_path, name=f"{name}.toml", server={"spool_dir": str(tmp_path / name), **server},
        transport=[smarthost_cfg(closed_port())],
    )  # fmt: skip
    path = tmp_path / f"{name}.log"
    with path.open("wb") as stream:
        st = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + (0 if journal else 1)}"}
        proc = subprocess.Popen(
            [*RELAY365, "serve", "-c", str(config), *args], stdin=subprocess.DEVNULL, stdout=stream,
            stderr=stream, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "relay365 listening:" not in path.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, path.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return path.read_text().splitlines()


@pytest.mark.parametrize(
    ("journal", "args", "server", "expect"),
    [
        (True, (), {}, "journal"),  # auto + stderr is the journal stream
        (False, (), {}, "text"),  # auto + JOURNAL_STREAM names another stream (a redirect)
        (True, ("--log-format", "json"), {"log_format": "text"}, "json+prefix"),  # flag over config
        (False, (), {"log_format": "json"}, "json"),
    ],
)
def test_serve_picks_the_format(
    tmp_path: Path, journal: bool, args: tuple[str, ...], server: dict[str, str], expect: str
) -> None:
    lines = serve_log(tmp_path, "run", *args, journal=journal, **server)
    assert any("relay365 listening: lan on 127.0.0.1:" in line for line in lines), lines
    if expect == "journal":
        assert all(re.match(r"<[0-7]>[\w.]+: ", line) for line in lines), lines
        assert (
            "<6>relay365.service.serve: shutting down: no new connections, finishing in-flight messages"
            in lines
        )
    elif expect == "text":
        # log lines with a timestamp, plus the plain "relay365 listening:" lines for the terminal
        stamped = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")
        assert all(stamped.match(line) or line.startswith("relay365 listening:") for line in lines), lines
    elif expect == "json+prefix":  # journald strips <N> and stores pure JSON with that PRIORITY
        assert all(re.match(r"<[0-7]>\{", line) for line in lines), lines
        records = [json.loads(line[3:]) for line in lines]
        assert {r["logger"] for r in records} >= {"relay365.service.serve", "relay365.serve"}
    else:
        records = [json.loads(line) for line in lines]
        assert {r["logger"] for r in records} >= {"relay365.service.serve", "relay365.serve"}


def test_startup_errors_use_the_log_format(tmp_path: Path) -> None:
    """A config that cannot start (a secret file others can read) is reported in the format the journal
    or a JSON shipper expects, and names the fix; a broken config before any format is known too."""
    secret = tmp_path / "secret"
    secret.write_text("Upstr3am-pw-5521-Jm\n")
    secret.chmod(0o644)
    bad_secret = {"name": "up", "type": "smarthost", "port": 2525, "tls": "required", "username": "u",
                  "password_file": str(secret)}  # fmt: skip
    journal_text = re.compile(r"relay365\.serve: error: .*/secret is readable by others .*chmod 600.*")
    for log_format in ("journal", "json"):
        config = write_config(tmp_path, server={"log_format": log_format}, transport=[bad_secret])
        r = run_cli("serve", "-c", str(config))
        assert r.returncode == 2
        assert "Upstr3am-pw-5521-Jm" not in r.stderr
        if log_format == "json":
            [line] = r.stderr.strip().splitlines()  # one object, even for a message of several lines
            record = json.loads(line)
            assert record["level"] == "ERROR" and "chmod 600" in record["message"]
        else:  # every line of the message is an error entry of the journal
            lines = r.stderr.strip().splitlines()
            assert all(line.startswith("<3>") for line in lines), lines
            assert journal_text.fullmatch("".join(line[3:] for line in lines)), lines
    broken = tmp_path / "broken.toml"
    broken.write_text("[server]\nlog_level = 'LOUD'\n")
    r = run_cli("serve", "-c", str(broken), "--log-format", "journal")
    assert r.returncode == 2
    assert r.stderr.startswith("<3>relay365.serve: error: Config 'server.log_level' has value 'LOUD'.")
