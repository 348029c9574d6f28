"""``relay365 serve --config FILE``: load the config, set up logging in the format asked for, run the relay
until SIGTERM, and report a failure in that same format (a journal line with priority 3 under systemd,
a JSON object with ``log_format = "json"``, a plain ``error:`` line in a terminal)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from relay365.errors import ConfigError, Relay365Error
from relay365.logformats import LogFormat, make_formatter, resolve_format
from relay365.logsetup import configure_logging
from relay365.service.relay import Relay
from relay365.service.reload import ReloadReport
from relay365.service.serve import make_redactor, secrets_of, serve
from relay365.settings import load_settings

log = logging.getLogger("relay365.serve")


def report_error(message: str, log_format: LogFormat) -> None:
    """One error line on stderr, formatted like the log (also before logging is set up)."""
    if resolve_format(log_format, stream=sys.stderr) == "text":
        from rich.console import Console  # imported to print: a relay run by systemd logs instead
        from rich.markup import escape

        Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", highlight=False)
        return
    record = logging.LogRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (message,), None)
    formatter = make_formatter(log_format, stream=sys.stderr, redact=str)
    sys.stderr.write(formatter.format(record) + "\n")
    sys.stderr.flush()


def serve_config(path: Path, *, log_format: LogFormat | None = None) -> int:
    """Run the relay of ``path``; the process exit code (0 after a clean SIGTERM, 2 on an error)."""
    try:
        settings = load_settings(path)
    except ConfigError as e:
        report_error(str(e), log_format or "auto")
        return 2
    fmt = log_format or settings.server.log_format
    redactor = make_redactor(settings)
    configure_logging(settings.server.log_level, redactor, fmt)
    # In a terminal the listening lines are plain; under the journal or as JSON they are log records.
    plain = resolve_format(fmt, stream=sys.stderr) == "text"

    def reloaded(relay: Relay, report: ReloadReport) -> None:
        """The new secrets are masked in the log from now on (the old ones stay masked); the new
        log level applies; listeners the reload opened are announced like those at start."""
        for secret in secrets_of(relay.settings):
            redactor.add(secret)
        logging.getLogger().setLevel(relay.settings.server.log_level)
        announce(relay, report.listeners_added)

    def ready(relay: Relay) -> None:
        announce(relay, [x.name for x in relay.settings.listeners])

    def announce(relay: Relay, names: list[str]) -> None:
        for listener in (x for x in relay.settings.listeners if x.name in names):
            line = (
                f"relay365 listening: {listener.name} on {listener.address}:{relay.ports.get(listener.name)}"
                f" (tls={listener.tls})"
            )
            if plain:
                print(line, file=sys.stderr, flush=True)
            else:
                log.info("%s", line)

    try:
        asyncio.run(serve(settings, ready=ready, reloaded=reloaded, log_format=fmt))
    except (Relay365Error, OSError) as e:  # never a secret: SecretError names only the key and file
        report_error(str(e), fmt)  # OSError: a listener address in use or not on this host
        return 2
    return 0
