"""Network checks: can we open a TCP connection to an upstream host and port?"""

from __future__ import annotations

import asyncio
import contextlib
import errno

from relay365.diagnostics.checks.result import CheckResult, failed, passed


async def check_tcp(host: str, port: int, *, timeout_s: float = 5.0) -> CheckResult:
    """Connect to ``host:port``: pass when it accepts, fail when refused, filtered or unresolvable."""
    name = f"TCP {host}:{port}"
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except TimeoutError:
        fix = "A firewall or the ISP drops this port"
        if port == 25:
            fix += " (ISPs often block outbound port 25: ask them, or use submission on 587 / Graph on 443)"
        return failed(name, f"no answer within {timeout_s:g} s (filtered)", fix)
    except ConnectionRefusedError:
        return failed(
            name, "connection refused (port closed)", "Check the host and port; is the service running?"
        )
    except OSError as exc:
        if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return failed(name, f"unreachable: {exc.strerror}", "Check routing from this host")
        return failed(name, f"cannot connect: {exc}", "Check the host name and DNS")
    elapsed = (loop.time() - start) * 1000
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return passed(name, f"connected in {elapsed:.0f} ms")
