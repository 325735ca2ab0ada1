"""A small in-process stand-in for Label Studio, for benchmarks (no pytest needed).

It serves what the backend's jobs read and write: task images under /data/upload/, projects,
tasks (paginated as LS does), and predictions (list, create, PATCH), behind a legacy token. HTTP/1.1
with keep-alive and TCP_NODELAY, like LS behind gunicorn, so a refresh's posting time is not
dominated by connection set-up or Nagle delays. Prediction writes are counted, not logged, and the time the fake spends
handling them (parse, store, answer) is summed in `counts["write_s"]`: it shares this process's CPU,
so a benchmark can tell its own cost from the backend's.
"""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class FakeLabelStudio:
    """Thread-safe fake LS on 127.0.0.1 (random port); `url` is its base URL."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.projects: dict[int, str] = {}          # id -> label config
        self.tasks: dict[int, dict] = {}
        self.images: dict[str, bytes] = {}          # path -> PNG bytes
        self.predictions: dict[int, dict] = {}
        self.counts: dict[str, float] = {"POST": 0, "PATCH": 0, "image": 0, "write_s": 0.0}
        self.lock = threading.Lock()
        self._next_prediction = 1
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

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
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeLabelStudio":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ HTTP
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in two writes: without TCP_NODELAY, Nagle + the client's
            # delayed ACK add ~40 ms to every keep-alive request (real LS servers do not)
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:
                pass

            def send(self, status: int, body=None, raw: bytes | None = None, ctype: str = "application/json"):
                data = raw if raw is not None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def body(self):
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n)) if n else None

            def route(self, method: str) -> None:
                t0 = time.perf_counter()
                body = self.body() if method in ("POST", "PATCH") else None
                if self.headers.get("Authorization") != f"Token {fake.token}":
                    return self.send(401, {"detail": "Authentication credentials were not provided."})
                parts = urlsplit(self.path)
                status, answer, raw, ctype = fake._answer(method, parts.path, parse_qs(parts.query), body)
                self.send(status, answer, raw, ctype)
                if body is not None:
                    with fake.lock:
                        fake.counts["write_s"] += time.perf_counter() - t0

            def do_GET(self):  # noqa: N802 - http.server API
                self.route("GET")

            def do_POST(self):  # noqa: N802
                self.route("POST")

            def do_PATCH(self):  # noqa: N802
                self.route("PATCH")

        return Handler

    def _answer(self, method: str, path: str, query: dict, body) -> tuple[int, object, bytes | None, str]:
        """(status, JSON body, raw body, content type) of one request."""
        json_ct = "application/json"
        with self.lock:
            if method == "GET" and path in self.images:
                self.counts["image"] += 1
                return 200, None, self.images[path], "image/png"
            if method == "GET" and (m := re.fullmatch(r"/api/projects/(\d+)/", path)):
                pid = int(m.group(1))
                if pid not in self.projects:
                    return 404, {"detail": "Not found."}, None, json_ct
                return 200, {"id": pid, "label_config": self.projects[pid]}, None, json_ct
            if method == "GET" and path == "/api/tasks/":
                pid = int(query.get("project", ["0"])[0])
                page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
                tasks = [t for _, t in sorted(self.tasks.items()) if t["project"] == pid]
                chunk = tasks[(page - 1) * size: page * size]
                if page > 1 and not chunk:
                    return 404, {"detail": "Invalid page."}, None, json_ct
                return 200, {"total": len(tasks), "tasks": chunk}, None, json_ct
            if method == "GET" and (m := re.fullmatch(r"/api/tasks/(\d+)/", path)):
                task = self.tasks.get(int(m.group(1)))
                return (200, task, None, json_ct) if task else (404, {"detail": "Not found."}, None, json_ct)
            if method == "GET" and path == "/api/predictions/":
                tid = int(query.get("task", ["0"])[0])
                return 200, [p for p in self.predictions.values() if p["task"] == tid], None, json_ct
            if method == "POST" and path == "/api/predictions/":
                self.counts["POST"] += 1
                pred = {**body, "id": self._next_prediction}
                self._next_prediction += 1
                self.predictions[pred["id"]] = pred
                return 201, pred, None, json_ct
            if method == "PATCH" and (m := re.fullmatch(r"/api/predictions/(\d+)/", path)):
                self.counts["PATCH"] += 1
                pred = self.predictions.get(int(m.group(1)))
                if pred is None:
                    return 404, {"detail": "Not found."}, None, json_ct
                pred.update(body)
                return 200, pred, None, json_ct
        return 404, {"detail": f"no route {method} {path}"}, None, json_ct
