"""A small in-process stand-in for Label Studio, for benchmarks (no pytest needed).

It serves what the backend's jobs read and write: task images under /data/upload/, projects,
tasks (paginated as LS does), and predictions (list, create, PATCH, bulk import, model versions:
count and delete), behind a legacy token. HTTP/1.1
with keep-alive and TCP_NODELAY, like LS behind gunicorn, so a refresh's posting time is not
dominated by connection set-up or Nagle delays. Prediction writes are counted, not logged, and the time the fake spends
handling them (parse, store, answer) is summed in `counts["write_s"]`: it shares this process's CPU,
so a benchmark can tell its own cost from the backend's.
"""
from __future__ import annotations

import re
import threading
import time

try:
    from bench.fake_http import Reply, Request, RouteServer
except ImportError:  # run with bench/ (not the repository root) on sys.path
    from fake_http import Reply, Request, RouteServer


class FakeLabelStudio:
    """Thread-safe fake LS on 127.0.0.1 (random port); `url` is its base URL."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.projects: dict[int, str] = {}          # id -> label config
        self.tasks: dict[int, dict] = {}
        self.images: dict[str, bytes] = {}          # path -> PNG bytes
        self.predictions: dict[int, dict] = {}
        self.counts: dict[str, float] = {"POST": 0, "PATCH": 0, "IMPORT": 0, "image": 0, "write_s": 0.0}
        self.lock = threading.Lock()
        self._next_prediction = 1
        # HTTP/1.1 keep-alive with TCP_NODELAY, as LS behind gunicorn
        self.http = RouteServer(self._route, nodelay=True, after=self._count_write)
        self.url = self.http.url

    # ------------------------------------------------------------------------------ content
    def add_project(self, pid: int, label_config: str) -> None:
        with self.lock:
            self.projects[pid] = label_config

    def add_task(self, pid: int, task_id: int, image_name: str, png: bytes, annotations=()) -> dict:
        """A task whose image LS serves at /data/upload/<pid>/<image_name>."""
        path = f"/data/upload/{pid}/{image_name}"
        task = {"id": task_id, "project": pid, "data": {"image": path}, "annotations": list(annotations),
                "predictions": []}
        with self.lock:
            self.images[path] = png
            self.tasks[task_id] = task
        return task

    def add_prediction(self, task_id: int, result: list, model_version: str, score: float = 0.0) -> int:
        """A prediction LS already holds (e.g. one it stored from a /predict answer); returns its id."""
        with self.lock:
            pred_id = self._next_prediction
            self._next_prediction += 1
            self.predictions[pred_id] = {"id": pred_id, "task": task_id, "result": result, "score": score,
                                         "model_version": model_version}
        return pred_id

    def writes(self) -> dict[str, float]:
        with self.lock:
            return dict(self.counts)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "FakeLabelStudio":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ HTTP
    def _route(self, req: Request) -> Reply:
        body = req.json() if req.method in ("POST", "PATCH", "DELETE") and req.raw else None
        if req.headers.get("Authorization") != f"Token {self.token}":
            return Reply(401, {"detail": "Authentication credentials were not provided."})
        return self._answer(req.method, req.path, req.query, body)

    def _count_write(self, req: Request) -> None:
        """Adds the time spent on a prediction write (read, parse, store, answer) to counts["write_s"]."""
        if req.method in ("POST", "PATCH", "DELETE") and req.raw:
            with self.lock:
                self.counts["write_s"] += time.perf_counter() - req.started

    def _answer(self, method: str, path: str, query: dict, body) -> Reply:
        """The reply to one authorized request."""
        with self.lock:
            if method == "GET" and path in self.images:
                self.counts["image"] += 1
                return Reply(200, self.images[path], "image/png")
            if method == "GET" and (m := re.fullmatch(r"/api/projects/(\d+)/", path)):
                pid = int(m.group(1))
                if pid not in self.projects:
                    return Reply(404, {"detail": "Not found."})
                return Reply(200, {"id": pid, "label_config": self.projects[pid]})
            if method == "GET" and path == "/api/tasks/":
                pid = int(query.get("project", ["0"])[0])
                page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
                tasks = [t for _, t in sorted(self.tasks.items()) if t["project"] == pid]
                chunk = tasks[(page - 1) * size: page * size]
                if page > 1 and not chunk:
                    return Reply(404, {"detail": "Invalid page."})
                return Reply(200, {"total": len(tasks), "tasks": chunk})
            if method == "GET" and (m := re.fullmatch(r"/api/tasks/(\d+)/", path)):
                task = self.tasks.get(int(m.group(1)))
                return Reply(200, task) if task else Reply(404, {"detail": "Not found."})
            if method == "GET" and path == "/api/predictions/":
                if "project" in query:
                    pid = int(query["project"][0])
                    return Reply(200, [p for p in self.predictions.values()
                                       if self.tasks.get(p["task"], {}).get("project") == pid])
                tid = int(query.get("task", ["0"])[0])
                return Reply(200, [p for p in self.predictions.values() if p["task"] == tid])
            if (m := re.fullmatch(r"/api/projects/(\d+)/model-versions/", path)) and method in ("GET", "DELETE"):
                pid = int(m.group(1))
                ours = {k: p for k, p in self.predictions.items() if self.tasks.get(p["task"], {}).get("project") == pid}
                if method == "GET":
                    versions: dict[str, int] = {}
                    for p in ours.values():
                        versions[p["model_version"]] = versions.get(p["model_version"], 0) + 1
                    return Reply(200, versions)
                gone = [k for k, p in ours.items() if p["model_version"] == (body or {}).get("model_version")]
                for k in gone:
                    del self.predictions[k]
                return Reply(200, {"deleted_predictions": len(gone)})
            if method == "POST" and re.fullmatch(r"/api/projects/(\d+)/import/predictions", path):
                self.counts["IMPORT"] += len(body)
                for item in body:
                    self.predictions[self._next_prediction] = {**item, "id": self._next_prediction}
                    self._next_prediction += 1
                return Reply(201, {"created": len(body)})
            if method == "POST" and path == "/api/predictions/":
                self.counts["POST"] += 1
                pred = {**body, "id": self._next_prediction}
                self._next_prediction += 1
                self.predictions[pred["id"]] = pred
                return Reply(201, pred)
            if method == "PATCH" and (m := re.fullmatch(r"/api/predictions/(\d+)/", path)):
                self.counts["PATCH"] += 1
                pred = self.predictions.get(int(m.group(1)))
                if pred is None:
                    return Reply(404, {"detail": "Not found."})
                pred.update(body)
                return Reply(200, pred)
        return Reply(404, {"detail": f"no route {method} {path}"})
