"""uvicorn as a part of a larger program: the relay's admin endpoint, the sandbox's HTTPS endpoint.

``uvicorn.Server.serve`` replaces the process's SIGINT and SIGTERM handlers while it runs (with
``signal.signal``, from the main thread) and raises the signal again when it is done. In a program that
serves other things on the same loop this takes the signals from their owner: SIGTERM would stop only the
HTTP endpoint, and where SIGINT is ignored (a job started in the background by a shell) the raised signal
is lost, so the program keeps running without its HTTP endpoint. The owner of the process (``relay365
serve``, ``relay365 sandbox``) handles the signals and stops the server it embeds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn


def embedded_server(config: uvicorn.Config) -> uvicorn.Server:
    """A ``uvicorn.Server`` that leaves the process's signal handlers alone."""
    import uvicorn

    class EmbeddedServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            yield

    return EmbeddedServer(config)
