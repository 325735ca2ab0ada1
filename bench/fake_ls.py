"""An in-process stand-in for Label Studio's REST API, for benchmarks and tests (no pytest needed).

It answers what the backend reads and writes, as LS does:

* task images at /data/upload/<pid>/<name>;
* GET /api/projects/<pid>/ (404 for an unknown project);
* GET /api/tasks/ paginated (`project`, `page`, `page_size`, `query` {"selectedItems": {"all": false,
  "included": [ids]}}; {"total", "tasks"}; 404 "Invalid page." past the end) and GET /api/tasks/<id>/,
  each task listing the predictions LS holds for it;
* GET /api/annotations/<id>/: an annotation of a task (found in the tasks' "annotations");
* predictions: GET /api/predictions/?task= or ?project=, POST, PATCH (404 for an unknown id), bulk
  POST /api/projects/<pid>/import/predictions;
* GET/DELETE /api/projects/<pid>/model-versions/: counts per version / delete one version, in that
  project only;

all behind a legacy token (`Authorization: Token <key>`). By default HTTP/1.1 with keep-alive and
TCP_NODELAY, like LS behind gunicorn, so a refresh's posting time is not dominated by connection
set-up or Nagle delays. Prediction writes are counted (`writes()`), and the time the fake spends
handling them (parse, store, answer) is summed in counts["write_s"]: it shares this process's CPU,
so a benchmark can tell its own cost from the backend's.

Tests subclass it: `dispatch` (every request; wrap it for faults), `authorized` / `unauthorized`
(the token check and its 401), `handle` (the routes, under `lock`), `record` (every prediction
write) and `project_of` (which project a prediction is in).
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from typing import Any

try:
    from bench.fake_http import Reply, Request, RouteServer
except ImportError:  # run with bench/ (not the repository root) on sys.path
    from fake_http import Reply, Request, RouteServer


def _not_found() -> Reply:
    return Reply(404, {"detail": "Not found."})


def _no_route(req: Request) -> Reply:
    return Reply(404, {"detail": f"no route {req.method} {req.path}"})


class FakeLabelStudio:
    """Thread-safe fake LS on `host` (random port); `url` is its base URL. `host`, `keep_alive` and
    `nodelay` go to its RouteServer, which calls `after(request)` once a reply has been written."""

    def __init__(self, token: str | None, *, host: str = "127.0.0.1", keep_alive: bool = True,
                 nodelay: bool = True) -> None:
        self.token = token
        self.projects: dict[int, str] = {}          # id -> label config
        self.tasks: dict[int, dict] = {}            # id -> task (its "predictions" are filled in when listed)
        self.images: dict[str, bytes] = {}          # upload file name (unique, as LS makes them) -> bytes
        self.predictions: dict[int, dict] = {}      # id -> prediction
        self.counts: dict[str, float] = {"POST": 0, "PATCH": 0, "IMPORT": 0, "DELETE-VERSION": 0, "image": 0,
                                         "write_s": 0.0}
        self.lock = threading.Lock()
        self._next = 100                            # the next prediction id
        self.http = RouteServer(self.dispatch, host=host, keep_alive=keep_alive, nodelay=nodelay,
                                after=self.after)
        self.url = self.http.url

    # ------------------------------------------------------------------------------ content
    def add_project(self, pid: int, label_config: str) -> None:
        with self.lock:
            self.projects[pid] = label_config

    def add_task(self, pid: int, task_id: int, image_name: str | None = None, png: bytes | None = None,
                 annotations=(), image_url: str | None = None) -> dict:
        """A task whose image LS serves at /data/upload/<pid>/<image_name> (`png`), or one showing
        an image already served (`image_url`)."""
        if (png is None) == (image_url is None):
            raise ValueError("a task needs either a new image (image_name, png) or an image_url")
        url = image_url or f"/data/upload/{pid}/{image_name}"
        task = {"id": task_id, "project": pid, "data": {"image": url}, "annotations": list(annotations),
                "predictions": []}
        with self.lock:
            if png is not None:
                self.images[image_name] = png
            self.tasks[task_id] = task
        return task

    def save_annotation(self, annotation: dict) -> dict:
        """Create or replace an annotation (by id) on its task (`annotation["task"]`), as a submit does."""
        with self.lock:
            held = self.tasks[annotation["task"]].setdefault("annotations", [])
            held[:] = [a for a in held if a.get("id") != annotation["id"]] + [annotation]
        return annotation

    def delete_annotation(self, annotation_id: int) -> None:
        with self.lock:
            for task in self.tasks.values():
                task["annotations"] = [a for a in task.get("annotations") or [] if a.get("id") != annotation_id]

    def add_prediction(self, task_id: int, result: list, model_version: str, score: float = 0.0) -> int:
        """A prediction LS already holds (e.g. one it stored from a /predict answer); returns its id."""
        with self.lock:
            pred_id = self._new_id()
            self.predictions[pred_id] = {"id": pred_id, "task": task_id, "result": result, "score": score,
                                         "model_version": model_version}
        return pred_id

    def writes(self) -> dict[str, float]:
        """The counts of prediction writes (an IMPORT counts its items), image downloads and write_s."""
        with self.lock:
            return dict(self.counts)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "FakeLabelStudio":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ hooks
    def dispatch(self, req: Request) -> object:
        """The reply to one request: `unauthorized` without the token, else `handle` under the lock."""
        auth = req.headers.get("Authorization")
        if not self.authorized(auth):
            return self.unauthorized(auth)
        with self.lock:
            return self.handle(req, req.method, req.path, req.query)

    def authorized(self, auth: str | None) -> bool:
        return self.token is not None and auth == f"Token {self.token}"

    def unauthorized(self, auth: str | None) -> Reply:
        return Reply(401, {"detail": "Authentication credentials were not provided."})

    def record(self, kind: str, path: str, body: Any) -> None:
        """Called under the lock for each prediction write before it is applied; `kind` is POST,
        PATCH, IMPORT (`body` is the list of items) or DELETE-VERSION (`body` {"model_version"})."""
        self.counts[kind] += len(body) if kind == "IMPORT" else 1

    def project_of(self, prediction: dict) -> int | None:
        """The project a prediction is in: its task's (None for a task this fake does not hold)."""
        return self.tasks.get(prediction["task"], {}).get("project")

    def after(self, req: Request) -> None:
        """Adds the time spent on a write (read, parse, store, answer) to counts["write_s"]."""
        if req.method in ("POST", "PATCH", "DELETE") and req.raw:
            with self.lock:
                self.counts["write_s"] += time.perf_counter() - req.started

    # ------------------------------------------------------------------------------ routes
    def handle(self, req: Request, method: str, path: str, query: dict[str, list[str]]) -> Reply:
        """The reply to one authorized request; the caller holds the lock."""
        if method == "GET" and (m := re.fullmatch(r"/data/upload/(\d+)/([^/]+)", path)):
            image = self.images.get(m.group(2)) if int(m.group(1)) in self.projects else None
            if image is None:
                return _not_found()
            self.counts["image"] += 1
            return Reply(200, image, "image/png")
        if m := re.fullmatch(r"/api/projects/(\d+)/(|model-versions/|import/predictions)", path):
            return self._project(req, int(m.group(1)), m.group(2))
        if method == "GET" and path == "/api/tasks/":
            return self._task_page(query)
        if method == "GET" and (m := re.fullmatch(r"/api/tasks/(\d+)/", path)):
            task = self.tasks.get(int(m.group(1)))
            return Reply(200, self._listed([task])[0]) if task else _not_found()
        if method == "GET" and (m := re.fullmatch(r"/api/annotations/(\d+)/", path)):
            found = [{**a, "task": t["id"], "project": t.get("project")} for t in self.tasks.values()
                     for a in t.get("annotations") or [] if a.get("id") == int(m.group(1))]
            return Reply(200, found[0]) if found else _not_found()
        if method == "GET" and path == "/api/predictions/":
            preds = list(self.predictions.values())
            if "task" in query:
                preds = [p for p in preds if p["task"] == int(query["task"][0])]
            if "project" in query:
                preds = [p for p in preds if self.project_of(p) == int(query["project"][0])]
            return Reply(200, preds)
        if method == "POST" and path == "/api/predictions/":
            body = req.json()
            self.record("POST", path, body)
            pred = {**body, "id": self._new_id()}
            self.predictions[pred["id"]] = pred
            return Reply(201, pred)
        if method == "PATCH" and (m := re.fullmatch(r"/api/predictions/(\d+)/", path)):
            body = req.json()
            self.record("PATCH", path, body)
            pred = self.predictions.get(int(m.group(1)))
            if pred is None:
                return _not_found()
            pred.update(body)
            return Reply(200, pred)
        return _no_route(req)

    def _project(self, req: Request, pid: int, route: str) -> Reply:
        """/api/projects/<pid>/<route>."""
        if pid not in self.projects:
            return _not_found()
        if req.method == "GET" and route == "":
            return Reply(200, {"id": pid, "label_config": self.projects[pid]})
        ours = {k: p for k, p in self.predictions.items() if self.project_of(p) == pid}
        if req.method == "GET" and route == "model-versions/":
            return Reply(200, dict(Counter(p["model_version"] for p in ours.values())))
        if req.method == "DELETE" and route == "model-versions/":
            version = (req.json() or {}).get("model_version")
            self.record("DELETE-VERSION", req.path, {"model_version": version})
            gone = [k for k, p in ours.items() if p["model_version"] == version]
            for k in gone:
                del self.predictions[k]
            return Reply(200, {"deleted_predictions": len(gone)})
        if req.method == "POST" and route == "import/predictions":
            items = req.json()
            self.record("IMPORT", req.path, items)
            for item in items:
                pred_id = self._new_id()
                self.predictions[pred_id] = {**item, "id": pred_id}
            return Reply(201, {"created": len(items)})
        return _no_route(req)

    def _task_page(self, query: dict[str, list[str]]) -> Reply:
        page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
        tasks = [t for _, t in sorted(self.tasks.items())
                 if "project" not in query or t.get("project") == int(query["project"][0])]
        selected = json.loads(query["query"][0]).get("selectedItems") if "query" in query else None
        if selected and not selected.get("all"):
            tasks = [t for t in tasks if t["id"] in selected.get("included", [])]
        chunk = tasks[(page - 1) * size:page * size]
        if page > 1 and not chunk:
            return Reply(404, {"detail": "Invalid page."})
        return Reply(200, {"total": len(tasks), "tasks": self._listed(chunk)})

    def _listed(self, tasks: list[dict]) -> list[dict]:
        """`tasks` as LS answers them: each with the predictions it holds."""
        held: dict[int, list[dict]] = {t["id"]: [] for t in tasks}
        for p in self.predictions.values():
            if p["task"] in held:
                held[p["task"]].append(p)
        return [{**t, "predictions": held[t["id"]]} for t in tasks]

    def _new_id(self) -> int:
        pred_id, self._next = self._next, self._next + 1
        return pred_id
