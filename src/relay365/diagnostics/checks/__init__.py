"""Doctor checks as library functions, each returning :class:`CheckResult` values.

Modules by concept: :mod:`.dns` (MX), :mod:`.spf_check` (SPF), :mod:`.network` (TCP reach),
:mod:`.tls` (handshake and certificate), :mod:`.smtp` (banner and EHLO capabilities); from a relay365.toml:
:mod:`.relaycfg` (config, listener certificates, spool, queue) and :mod:`.auth` (token, XOAUTH2, Graph).
"""

from relay365.diagnostics.checks.result import CheckResult, Status

__all__ = ["CheckResult", "Status"]
