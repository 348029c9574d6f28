"""OAuth2 tokens from Microsoft Entra ID (or the sandbox) through msal, refreshed unattended.

* App-only (client credentials) with a client secret or a certificate: scope
  ``https://outlook.office365.com/.default`` for SMTP XOAUTH2, ``https://graph.microsoft.com/.default``
  for Graph (exchange-online.md, "SMTP AUTH (option 1) in detail").
* Delegated: a refresh token obtained once with ``relay365 login`` (device code flow), kept in a
  0600 token cache file and refreshed silently for months.

A token is reused until ``refresh_ahead`` seconds before it expires. Any failure (endpoint down,
``invalid_client``, ``invalid_grant``) raises :class:`relay365.errors.TokenError`: the transport turns it
into a transient failure, so mail waits and is never bounced, and an ALERT line is logged.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msal
import requests
import requests.adapters

from relay365.credentials import load_secret
from relay365.errors import ConfigError, TokenError
from relay365.settings import TransportSettings

log = logging.getLogger(__name__)
SMTP_SCOPE = "https://outlook.office365.com/.default"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
DELEGATED_SMTP_SCOPES = ("https://outlook.office.com/SMTP.Send",)
PUBLIC_AUTHORITY = "https://login.microsoftonline.com"


@dataclass(frozen=True, slots=True)
class TokenState:
    """What the console shows of a token source (never the token itself)."""

    expires_at: float | None
    last_refresh: float | None
    last_error: str  # the last failure, e.g. "invalid_client: AADSTS7000215: ..." ("" after a success)


@dataclass(frozen=True, slots=True)
class OAuthSettings:
    tenant: str
    client_id: str
    authority_host: str = PUBLIC_AUTHORITY  # national clouds and the sandbox set their own
    client_secret: str | None = None
    certificate_pem: str | None = None  # private key + certificate, for certificate credentials
    certificate_thumbprint: str | None = None
    token_cache: Path | None = None  # delegated flows: where the refresh token lives (0600)
    username: str | None = None  # delegated flows: which account's refresh token to use
    ca_file: Path | None = None  # trust for the authority (the sandbox's own CA)
    refresh_ahead: float = 300.0

    @property
    def authority(self) -> str:
        return f"{self.authority_host.rstrip('/')}/{self.tenant}"


def _raise_for(result: dict[str, Any] | None, what: str) -> dict[str, Any]:
    if not result:
        raise TokenError(f"{what}: no token (no cached account; run 'relay365 login')")
    if "access_token" not in result:
        code = result.get("error", "unknown_error")
        desc = " ".join(str(result.get("error_description", "")).split())[:300]
        raise TokenError(f"{what}: {code}: {desc}")
    return result


def _http_session(ca_file: Path | None) -> requests.Session:
    """msal's HTTP client. With a private CA (the sandbox, an inspecting proxy's CA) the environment's
    REQUESTS_CA_BUNDLE must not override it, so the session ignores the environment then."""
    session = requests.Session()
    if ca_file is not None:
        session.verify = str(ca_file)
        session.trust_env = False
    session.mount("https://", requests.adapters.HTTPAdapter(max_retries=1))
    session.request = functools.partial(session.request, timeout=30)  # type: ignore[method-assign]
    return session


class TokenSource:
    """``await source.token()`` returns a valid access token: ``Callable[[], Awaitable[str]]``."""

    def __init__(
        self, settings: OAuthSettings, *, scopes: tuple[str, ...], clock: Callable[[], float] = time.time
    ) -> None:
        self._s = settings
        self._scopes = list(scopes)
        self._clock = clock
        self._token: str | None = None
        self._refused = False  # the upstream refused the last token: msal's cached copy must not return
        self._expires_at = 0.0
        self._last_refresh: float | None = None
        self._last_error = ""
        self._lock = asyncio.Lock()
        self._cache = msal.SerializableTokenCache()
        if settings.token_cache is not None and settings.token_cache.exists():
            self._cache.deserialize(settings.token_cache.read_text(encoding="utf-8"))
        self._app: msal.ClientApplication | None = None
        self._session = _http_session(settings.ca_file)

    def close(self) -> None:
        """Close msal's pooled HTTPS connections."""
        self._session.close()

    def _client(self) -> msal.ClientApplication:
        if self._app is None:
            s = self._s
            common: dict[str, Any] = {
                "authority": s.authority,
                "token_cache": self._cache,
                "instance_discovery": s.authority_host == PUBLIC_AUTHORITY,
                "http_client": self._session,
            }
            if s.client_secret or s.certificate_pem:
                credential: Any = s.client_secret or {
                    "private_key": s.certificate_pem,
                    "thumbprint": s.certificate_thumbprint,
                }
                self._app = msal.ConfidentialClientApplication(
                    s.client_id, client_credential=credential, **common
                )
            else:
                self._app = msal.PublicClientApplication(s.client_id, **common)
        return self._app

    @property
    def delegated(self) -> bool:
        return not (self._s.client_secret or self._s.certificate_pem)

    def _acquire(self) -> dict[str, Any]:
        try:
            app = self._client()
            if not self.delegated:
                assert isinstance(app, msal.ConfidentialClientApplication)
                if self._refused:
                    # msal hands back its cached app token until it expires: after a 401 / 535 it must
                    # fetch a new one (the old one may be revoked, or issued before a permission change).
                    app.remove_tokens_for_client()
                result = app.acquire_token_for_client(scopes=self._scopes)
                return _raise_for(result, f"token for {self._s.client_id}")
            accounts = app.get_accounts(username=self._s.username)
            if not accounts:
                raise TokenError(
                    f"no signed-in account {self._s.username or ''} in the token cache; run 'relay365 login'"
                )
            result = app.acquire_token_silent_with_error(
                self._scopes, account=accounts[0], force_refresh=True
            )
            out = _raise_for(result, f"refresh for {self._s.username}")
            self._save_cache()
            return out
        except TokenError:
            raise
        except Exception as e:  # msal raises requests/ValueError/... for endpoint trouble
            raise TokenError(f"token endpoint {self._s.authority}: {type(e).__name__}: {e}") from e

    def _save_cache(self) -> None:
        path = self._s.token_cache
        if path is None or not self._cache.has_state_changed:
            return
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(self._cache.serialize())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._cache.has_state_changed = False

    async def token(self) -> str:
        async with self._lock:
            now = self._clock()
            if self._token is None or now >= self._expires_at - self._s.refresh_ahead:
                try:
                    result = await asyncio.to_thread(self._acquire)
                except TokenError as e:
                    self._last_error = str(e)
                    log.critical("ALERT token: %s (mail waits in the queue)", e)
                    raise
                self._token = str(result["access_token"])
                self._refused = False
                self._expires_at = now + float(result.get("expires_in", 3600))
                self._last_refresh, self._last_error = now, ""
                log.info("token for %s refreshed, valid %ds", self._s.client_id, int(self._expires_at - now))
            return self._token

    def state(self) -> TokenState:
        return TokenState(self._expires_at or None, self._last_refresh, self._last_error)

    def invalidate(self) -> None:
        """Forget the token (after the upstream refused it): the next ``token()`` fetches a new one from
        the token endpoint, never msal's cached copy of the refused one."""
        self._token = None
        self._refused = True

    def login_device_flow(self, prompt: Callable[[str], None]) -> str:
        """Interactive, once: the device code flow; the refresh token lands in the token cache."""
        app = self._client()
        assert isinstance(app, msal.PublicClientApplication)
        flow = app.initiate_device_flow(scopes=self._scopes)
        if "user_code" not in flow:
            raise TokenError(f"device code flow: {json.dumps(flow)[:300]}")
        prompt(str(flow["message"]))
        result = _raise_for(app.acquire_token_by_device_flow(flow), "device code flow")
        self._save_cache()
        claims = result.get("id_token_claims") or {}
        return str(claims.get("preferred_username") or self._s.username or "")


def token_source(settings: TransportSettings, *, scope: str) -> TokenSource:
    m = settings.m365
    if not (m.tenant and m.client_id):
        raise ConfigError(f"transport {settings.name}.client_id", m.client_id, "OAuth needs it.")
    cert_pem = m.certificate_file.read_text(encoding="utf-8") if m.certificate_file else None
    delegated = not (m.client_secret or cert_pem)
    oauth = OAuthSettings(
        tenant=m.tenant,
        client_id=m.client_id,
        authority_host=m.authority,
        client_secret=load_secret(m.client_secret) if m.client_secret else None,
        certificate_pem=cert_pem,
        certificate_thumbprint=m.certificate_thumbprint,
        token_cache=m.token_cache,
        username=m.delegated_user or m.mailbox,
        ca_file=m.authority_ca_file,
    )
    scopes = DELEGATED_SMTP_SCOPES if delegated and scope == SMTP_SCOPE else (scope,)
    return TokenSource(oauth, scopes=scopes)
