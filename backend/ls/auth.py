"""Label Studio API keys, and the origin (scheme, host, port) each one belongs to.

Two kinds of API key exist (LS docs "access tokens"):
* legacy token (opaque, usually 40 hex): `Authorization: Token <key>`;
* personal access token (a JWT refresh token): exchanged at POST /api/token/refresh/ for a
  short-lived access JWT (300 s in LS 1.23), sent as `Authorization: Bearer <access>`.

A key belongs to the Label Studio it came with: `LSAuth.origin` (scheme, host, port), and it is
sent nowhere else, not to another port or scheme of the same host, nor across a redirect.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

import jwt
import requests

from backend.errors import LabelStudioAPIError

log = logging.getLogger(__name__)

_REFRESH_MARGIN_S = 30.0
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _jwt_claims(token: str) -> dict | None:
    """Claims of a JWT (not verified: LS verifies, we only read `exp`), or None if not a JWT."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    return claims if isinstance(claims, dict) else None


def origin(url: str | None) -> str | None:
    """'scheme://host:port' of an http(s) URL: scheme and host lowercased, the default port made
    explicit, an IPv6 host in brackets; None for anything else. Two URLs may share credentials
    only when their origins are equal (a browser's same-origin rule)."""
    try:
        parts = urlsplit((url or "").strip())
        port = parts.port
    except ValueError:  # a port that is not a number or out of range
        return None
    scheme, host = parts.scheme.lower(), parts.hostname  # hostname: lowercased, brackets removed
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port if port is not None else _DEFAULT_PORTS[scheme]}"


class LSAuth:
    """Authorization header for the Label Studio at `ls_url`; thread-safe, caches the access token
    of a PAT until 30 s before its `exp`. The key is tied to that origin: `sends_to(url)` says
    whether a URL may receive it (a key made without `ls_url` goes nowhere)."""

    def __init__(self, api_key: str, ls_url: str | None = None, *,
                 timeout: tuple[float, float] = (5, 30), session: requests.Session | None = None):
        self._key = (api_key or "").strip()
        if not self._key:
            raise ValueError("empty Label Studio API key")
        self.kind = "pat" if _jwt_claims(self._key) is not None else "legacy"
        self._ls_url = ls_url.rstrip("/") if ls_url else None
        self.origin = origin(ls_url)
        self._timeout = timeout
        self._session = session or requests.Session()
        self._lock = threading.Lock()
        self._access: str | None = None
        self._access_until = 0.0

    def __repr__(self) -> str:
        return f"LSAuth(kind={self.kind!r})"

    def sends_to(self, url: str) -> bool:
        """Whether `url` is on this key's Label Studio origin (scheme, host and port)."""
        return self.origin is not None and origin(url) == self.origin

    @property
    def refreshable(self) -> bool:
        """Whether a 401 can be cured by asking for a new access token."""
        return self.kind == "pat"

    def redact(self, text: str) -> str:
        """`text` with the key and the current access token masked."""
        for secret in (self._key, self._access):
            if secret:
                text = text.replace(secret, "***")
        return text

    def headers(self, rejected: Mapping[str, str] | None = None) -> dict[str, str]:
        """Headers to send to LS. `rejected`: headers LS just answered 401 to; forces one refresh
        unless another thread already replaced that token."""
        if self.kind == "legacy":
            return {"Authorization": f"Token {self._key}"}
        with self._lock:
            stale = rejected is not None and rejected.get("Authorization") == f"Bearer {self._access}"
            if stale or self._access is None or time.time() >= self._access_until:
                self._refresh()
            return {"Authorization": f"Bearer {self._access}"}

    def _refresh(self) -> None:
        if not self._ls_url:
            raise LabelStudioAPIError("a personal access token must be exchanged at LABEL_STUDIO_URL, "
                                      "which is not set")
        url = f"{self._ls_url}/api/token/refresh/"
        try:  # never redirected: a 307/308 would carry the key in the body to wherever it points
            resp = self._session.post(url, json={"refresh": self._key}, timeout=self._timeout,
                                      allow_redirects=False)
        except requests.RequestException as e:
            raise LabelStudioAPIError(f"token refresh at {url} failed ({type(e).__name__}); "
                                      "LABEL_STUDIO_URL not reachable from the backend") from None
        if resp.is_redirect:
            raise LabelStudioAPIError(f"token refresh at {url} was redirected; the key is not sent on: set "
                                      "LABEL_STUDIO_URL to Label Studio's final address (scheme, host, port)",
                                      status=resp.status_code)
        if resp.status_code != 200:
            raise LabelStudioAPIError(
                "personal access token rejected by /api/token/refresh/ (expired, revoked, or from another "
                "Label Studio); check LABEL_STUDIO_API_KEY", status=resp.status_code)
        try:
            access = resp.json()["access"]
        except (ValueError, KeyError, TypeError):
            raise LabelStudioAPIError("/api/token/refresh/ answered without an access token",
                                      status=resp.status_code) from None
        exp = (_jwt_claims(access) or {}).get("exp")
        self._access = access
        self._access_until = float(exp) - _REFRESH_MARGIN_S if exp else math.inf
        log.debug("refreshed Label Studio access token")
