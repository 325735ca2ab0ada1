"""The few REST calls the backend makes to Label Studio.

Plain `requests` rather than the SDK client: the SDK reads LABEL_STUDIO_API_KEY at import time and
raises at construction for an expired personal access token, and we need one retry policy that
never repeats a write Label Studio may have committed (`LSRetry`) and messages that never contain
the key.

Keys and their origins: backend.ls.auth; sessions and the retry policy: backend.ls.session.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import requests

from backend.errors import LabelStudioAPIError
from backend.ls.auth import LSAuth, origin
from backend.ls.session import retrying_session

log = logging.getLogger(__name__)

_STATUS_HINTS = {
    401: "check LABEL_STUDIO_API_KEY (legacy token vs personal access token)",
    403: "the API key's user lacks access to this project",
    404: "check LABEL_STUDIO_URL and the id",
}


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
