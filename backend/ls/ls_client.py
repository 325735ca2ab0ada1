"""Authentication against Label Studio and the few REST calls the backend makes.

Plain `requests` rather than the SDK client: the SDK reads LABEL_STUDIO_API_KEY at import time and
raises at construction for an expired personal access token, and we need one retry policy that
never repeats a write Label Studio may have committed (`LSRetry`) and messages that never contain
the key.

Two kinds of API key exist (LS docs "access tokens"):
* legacy token (opaque, usually 40 hex): `Authorization: Token <key>`;
* personal access token (a JWT refresh token): exchanged at POST /api/token/refresh/ for a
  short-lived access JWT (300 s in LS 1.23), sent as `Authorization: Bearer <access>`.

A key belongs to the Label Studio it came with: `LSAuth.origin` (scheme, host, port), and it is
sent nowhere else, not to another port or scheme of the same host, nor across a redirect.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import jwt
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from backend.errors import LabelStudioAPIError

log = logging.getLogger(__name__)

_REFRESH_MARGIN_S = 30.0
_DEFAULT_PORTS = {"http": 80, "https": 443}
_STATUS_HINTS = {
    401: "check LABEL_STUDIO_API_KEY (legacy token vs personal access token)",
    403: "the API key's user lacks access to this project",
    404: "check LABEL_STUDIO_URL and the id",
}


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


class OriginSession(requests.Session):
    """A Session that drops the Authorization header on every redirect that leaves the origin.

    requests' own rule keeps it on an http -> https upgrade of the same host (default ports), a
    different origin; here any change of scheme, host or port strips it."""

    def should_strip_auth(self, old_url: str, new_url: str) -> bool:
        old = origin(old_url)
        return old is None or old != origin(new_url)


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


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"})
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_AFTER_MAX_S = 60


class LSRetry(Retry):
    """urllib3's Retry with the one policy for requests to Label Studio (and image hosts).

    * Every method is retried when the connection could not be made (urllib3 counts only those as
      connect errors: the request was never sent).
    * Idempotent methods (GET, PATCH, DELETE: a repeat changes nothing more) are also retried on a
      read error (read timeout, connection dropped) and on 429, 500, 502, 503, 504.
    * A POST (creating predictions, importing) is retried only when Label Studio refused it: 429,
      or 503 with Retry-After. Not on 502/504 or a read timeout: a proxy's 502/504 may come while
      LS goes on committing it, and a repeat would duplicate the predictions.
    * The wait is Retry-After when the answer has one (at most RETRY_AFTER_MAX_S), else
      exponential: the first retry at once, then backoff * 2, * 4, ...
    * TLS and other errors are not retried; a 401 is left to the caller (a PAT refresh).
    """

    RETRY_AFTER_STATUS_CODES = frozenset({429, 503})

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        if method.upper() in self.allowed_methods:
            return super().is_retry(method, status_code, has_retry_after)
        return status_code == 429 or (status_code == 503 and has_retry_after)  # refused, not committed


def retrying_session(retries: int, backoff: float) -> requests.Session:
    """An OriginSession whose every request follows LSRetry, at most `retries` retries; the last
    answer is returned when they are spent (its status, not an exception)."""
    policy = LSRetry(total=retries, other=0, allowed_methods=IDEMPOTENT_METHODS, status_forcelist=RETRY_STATUSES,
                     backoff_factor=backoff, raise_on_status=False, retry_after_max=RETRY_AFTER_MAX_S)
    session = OriginSession()
    adapter = HTTPAdapter(max_retries=policy)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class LabelStudioClient:
    """The REST calls the backend needs, with LSRetry's policy (at most `retries` retries), so
    predictions are never created twice by a retry. `auth` must belong to `url`'s origin; a
    redirect elsewhere is followed without it."""

    def __init__(self, url: str, auth: LSAuth | None, timeout: tuple[float, float] = (5, 30),
                 retries: int = 3, backoff: float = 0.5):
        if not url or not url.startswith(("http://", "https://")):
            raise ValueError(f"LABEL_STUDIO_URL must start with http:// or https://, got {url!r}")
        if auth is not None and not auth.sends_to(url):
            raise ValueError(f"the Label Studio key belongs to {auth.origin or 'no URL'}, not to {origin(url)}")
        self.url = url.rstrip("/")
        self.auth = auth
        self.timeout = timeout
        self._session = retrying_session(retries, backoff)

    def _request(self, method: str, path: str, *, params: dict | None = None, json: Any = None) -> Any:
        """The JSON answer of one call. Retries happen below, in the session (LSRetry); a 401 to a
        PAT's access token is answered with one refresh and one more try (LS refused it: safe even
        for a POST)."""
        url = f"{self.url}/{path}"
        what = f"{method} /{path}"
        headers = self.auth.headers() if self.auth else {}
        refreshed = False
        while True:
            try:
                resp = self._session.request(method, url, params=params, json=json, headers=headers,
                                             timeout=self.timeout)
            except requests.ReadTimeout:
                raise LabelStudioAPIError(f"{what}: no answer within {self.timeout[1]:g} s (ReadTimeout)"
                                          + ("; not repeated, Label Studio may have applied it"
                                             if method == "POST" else "")) from None
            except (requests.ConnectionError, requests.Timeout) as e:
                raise LabelStudioAPIError(f"{what} failed ({type(e).__name__}); LABEL_STUDIO_URL not "
                                          "reachable from the backend") from None
            status = resp.status_code
            if status == 401 and self.auth is not None and self.auth.refreshable and not refreshed:
                headers, refreshed = self.auth.headers(rejected=headers), True
                continue
            if status >= 400:
                detail = resp.text[:300]
                if self.auth is not None:
                    detail = self.auth.redact(detail)
                hint = _STATUS_HINTS.get(status)
                raise LabelStudioAPIError(f"{what} failed: {detail}" + (f"; {hint}" if hint else ""), status=status)
            if status == 204 or not resp.content:
                return None
            try:
                return resp.json()
            except ValueError:
                raise LabelStudioAPIError(f"{what} answered with non-JSON content", status=status) from None

    def get_project(self, project_id: int) -> dict:
        return self._request("GET", f"api/projects/{int(project_id)}/")

    def get_task(self, task_id: int) -> dict:
        """Task with annotations and predictions.

        Beware: LS runs ML predictions for a task without predictions when it is opened this way
        (show_collab_predictions, on by default), i.e. it may call this backend's /predict before
        answering; do not call this while holding resources /predict needs.
        """
        return self._request("GET", f"api/tasks/{int(task_id)}/")

    def get_annotation(self, annotation_id: int) -> dict:
        """One annotation as LS holds it (`result`, `task`, `project`, `was_cancelled`, ...)."""
        return self._request("GET", f"api/annotations/{int(annotation_id)}/")

    def get_tasks(self, project_id: int, task_ids: Iterable[int], chunk: int = 100) -> list[dict]:
        """The tasks among `task_ids` that the project holds (absent ones are left out), with
        annotations and predictions: the project's task listing narrowed to those ids, `chunk` per
        request. Unlike GET /api/tasks/<id>/ it does not make LS call /predict for a task without
        predictions (only `evaluate_predictions_automatically` does, as for `iter_tasks`)."""
        ids = sorted({int(t) for t in task_ids})
        found: list[dict] = []
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            query = json.dumps({"selectedItems": {"all": False, "included": part}})
            body = self._request("GET", "api/tasks/", params={
                "project": int(project_id), "page": 1, "page_size": len(part), "fields": "all", "query": query})
            tasks = body if isinstance(body, list) else (body or {}).get("tasks") or []
            found += [t for t in tasks if isinstance(t, dict) and t.get("id") in part]
        return found

    def iter_tasks(self, project_id: int, page_size: int = 100) -> Iterator[dict]:
        """All tasks of a project, with annotations and predictions (`fields=all`; LS's default
        `task_only` leaves them out). LS answers `{"total", "tasks": [...]}` per page and 404 past
        the last page. With `evaluate_predictions_automatically` on, LS may call /predict for the
        page's unpredicted tasks before answering."""
        page, seen = 1, 0
        while True:
            params = {"project": int(project_id), "page": page, "page_size": page_size, "fields": "all"}
            try:
                body = self._request("GET", "api/tasks/", params=params)
            except LabelStudioAPIError as e:
                if e.status == 404 and page > 1:
                    return
                raise
            if isinstance(body, list):  # unpaginated answer: that was everything
                yield from body
                return
            tasks = (body or {}).get("tasks") or []
            yield from tasks
            seen += len(tasks)
            total = (body or {}).get("total")
            if len(tasks) < page_size or (total is not None and seen >= int(total)):
                return
            page += 1

    def list_predictions(self, task_id: int) -> list[dict]:
        body = self._request("GET", "api/predictions/", params={"task": int(task_id)})
        return body.get("results", []) if isinstance(body, dict) else list(body or [])

    def list_project_predictions(self, project_id: int) -> list[dict]:
        """Every prediction of a project (LS answers them all at once, results included)."""
        body = self._request("GET", "api/predictions/", params={"project": int(project_id)})
        return body.get("results", []) if isinstance(body, dict) else list(body or [])

    def model_version_counts(self, project_id: int) -> dict[str, int]:
        """{model_version: number of predictions} of a project (a cheap aggregate query)."""
        body = self._request("GET", f"api/projects/{int(project_id)}/model-versions/")
        return {str(k): int(v) for k, v in (body or {}).items()} if isinstance(body, dict) else {}

    def import_predictions(self, project_id: int, items: list[dict]) -> int:
        """Create many predictions in one request ({task, result, score, model_version} each);
        returns how many LS created."""
        body = self._request("POST", f"api/projects/{int(project_id)}/import/predictions", json=items)
        return int(body.get("created", 0)) if isinstance(body, dict) else 0

    def delete_model_version(self, project_id: int, model_version: str) -> int:
        """Delete every prediction of one model_version in a project; returns how many.

        LS deletes ALL the project's predictions when the version is empty: refused here."""
        if not model_version:
            raise ValueError("refusing to delete predictions without a model_version")
        body = self._request("DELETE", f"api/projects/{int(project_id)}/model-versions/",
                             json={"model_version": model_version})
        return int((body or {}).get("deleted_predictions", 0)) if isinstance(body, dict) else 0

    def create_prediction(self, task_id: int, result: list[dict], score: float | None,
                          model_version: str) -> dict:
        return self._request("POST", "api/predictions/", json={
            "task": int(task_id), "result": result, "score": score, "model_version": model_version})

    def update_prediction(self, prediction_id: int, *, result: list[dict] | None = None,
                          score: float | None = None, model_version: str | None = None,
                          task_id: int | None = None) -> dict:
        """PATCH only the given fields (LS strict validation needs the task id with a result)."""
        body = {k: v for k, v in (("result", result), ("score", score), ("model_version", model_version),
                                  ("task", task_id)) if v is not None}
        return self._request("PATCH", f"api/predictions/{int(prediction_id)}/", json=body)
