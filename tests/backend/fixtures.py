"""Label Studio payloads as LS 1.23.2 sends them (recorded from a live server).

Shared by the backend test files. Only the parts LS really sends are here; long fields that
LS sends but nobody reads (timestamps, counters) keep their documented shape. At the end: a
scripted local HTTP server standing in for Label Studio and image hosts.
"""
from bench.fake_http import JSON, Reply, Request, RouteServer


def purge_queues(settings) -> None:
    """Delete one test deployment's RQ jobs, queues and keys (its queue prefix) from Redis."""
    import redis
    from rq.job import Job

    from backend import queueing

    conn = redis.Redis.from_url(settings.redis_url)
    for info in queueing.list_jobs(1000):
        Job.fetch(info.id, connection=conn, serializer=queueing.SERIALIZER).delete()
    for queue in queueing.backend().queues.values():
        queue.delete(delete_jobs=True)  # also leaves rq's global queue set
    patterns = [f"{settings.queue_prefix}:*"] + [f"rq:*{settings.queue_name(q)}*" for q in queueing.QUEUES]
    for pattern in patterns:
        for key in conn.scan_iter(match=pattern):
            conn.delete(key)


LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"

# A 3-control config (polygon, rectangle and brush controls on one image).
CONFIG_XML = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="bbox" toName="image"><Label value="Cat"/><Label value="Dog"/></RectangleLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Cat"/><Label value="Dog"/></PolygonLabels>
  <BrushLabels name="brush" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
</View>"""

# Same controls plus the optional model_* attributes and predicted_values.
CONFIG_WITH_ATTRS_XML = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <RectangleLabels name="bbox" toName="image" model_score_threshold="0.6" model_max_detections="2">
    <Label value="Cat" predicted_values="kitty, feline"/><Label value="Dog"/>
  </RectangleLabels>
  <PolygonLabels name="poly" toName="image" model_polygon_tolerance="0">
    <Label value="Cat"/><Label value="Dog"/>
  </PolygonLabels>
  <BrushLabels name="brush" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
  <Choices name="quality" toName="image"><Choice value="good"/><Choice value="bad"/></Choices>
</View>"""

PROJECT_UID = "1.1795705944"

# POST /setup (extra_params null as LS 1.23.2 sent it)
SETUP_BODY = {
    "project": PROJECT_UID,
    "schema": CONFIG_XML,
    "hostname": "http://localhost:8080",
    "access_token": LEGACY_TOKEN,
    "extra_params": None,
}

# LS-RLE of a 64x48 mask with rows 12..35, columns 16..47 set to 255 (the stub's Cat brush).
BRUSH_RLE_64x48 = [
    0, 0, 48, 0, 57, 27, 255, 12, 63, 0, 207, 255, 249, 252, 3, 63, 255, 231, 240, 12, 255, 255, 159, 192,
    51, 255, 254, 127, 0, 207, 255, 249, 252, 3, 63, 255, 231, 240, 12, 255, 255, 159, 192, 51, 255, 254,
    127, 0, 207, 255, 249, 252, 3, 63, 255, 231, 240, 12, 255, 255, 159, 192, 51, 255, 254, 127, 0, 207,
    255, 249, 252, 3, 63, 255, 231, 240, 12, 255, 255, 159, 192, 51, 255, 254, 127, 0, 207, 255, 249, 252,
    3, 63, 255, 231, 240, 12, 255, 255, 159, 192, 51, 255, 254, 127, 0, 207, 255, 249, 252, 3, 63, 255,
    231, 240, 12, 255, 255, 159, 192, 51, 255, 255, 12, 63, 0, 0,
]

RECT_REGION = {
    "id": "a1", "from_name": "bbox", "to_name": "image", "type": "rectanglelabels",
    "original_width": 64, "original_height": 48, "image_rotation": 0,
    "value": {"x": 20, "y": 20, "width": 40, "height": 40, "rotation": 0, "rectanglelabels": ["Dog"]},
}
POLY_REGION = {
    "id": "p1", "from_name": "poly", "to_name": "image", "type": "polygonlabels",
    "original_width": 64, "original_height": 48, "image_rotation": 0,
    "value": {"points": [[25.0, 25.0], [75.0, 25.0], [75.0, 75.0], [25.0, 75.0]], "closed": True,
              "polygonlabels": ["Dog"]},
}
BRUSH_REGION = {
    "id": "b1", "from_name": "brush", "to_name": "image", "type": "brushlabels",
    "original_width": 64, "original_height": 48, "image_rotation": 0,
    "value": {"format": "rle", "rle": BRUSH_RLE_64x48, "brushlabels": ["Cat"]},
}


def _task(task_id, image, annotations=(), **extra):
    task = {
        "id": task_id, "data": {"image": image}, "meta": {}, "created_at": "2026-11-26T16:40:01.123456Z",
        "updated_at": "2026-11-26T16:40:01.123456Z", "is_labeled": bool(annotations), "overlap": 1,
        "inner_id": task_id, "total_annotations": len(annotations), "cancelled_annotations": 0,
        "total_predictions": 0, "comment_count": 0, "unresolved_comment_count": 0,
        "last_comment_updated_at": None, "project": 1, "updated_by": 1 if annotations else None,
        "file_upload": None, "comment_authors": [], "annotations": list(annotations), "predictions": [],
    }
    task.update(extra)
    return task


ANNOTATION = {
    "id": 1, "result": [RECT_REGION], "was_cancelled": False, "ground_truth": False,
    "created_at": "2026-11-26T16:41:00.000000Z", "updated_at": "2026-11-26T16:41:00.000000Z",
    "draft_created_at": None, "lead_time": 1.5, "prediction": {}, "result_count": 1,
    "unique_id": "8d1f5a4e-6b0c-4a8e-9f51-3b0c1d2e3f40", "import_id": None, "last_action": None,
    "bulk_created": False, "task": 1, "project": 1, "updated_by": 1, "parent_prediction": None,
    "parent_annotation": None, "last_created_by": None, "completed_by": 1,
}

# POST /predict with 2 tasks (task 1 is annotated)
PREDICT_BODY = {
    "tasks": [
        _task(1, "/data/local-files/?d=images/local1.png", annotations=[ANNOTATION]),
        _task(2, "/data/upload/1/3ab875df-img3.png", file_upload=1),
    ],
    "project": PROJECT_UID,
    "label_config": CONFIG_XML,
    "params": {"login": None, "password": None, "context": None},
}

# POST /predict from an interactive smart tool
INTERACTIVE_PREDICT_BODY = {
    "tasks": [_task(2, "/data/upload/1/3ab875df-img3.png", file_upload=1, drafts=[])],
    "project": PROJECT_UID,
    "label_config": CONFIG_XML,
    "params": {"login": None, "password": None, "context": {
        "annotation_id": None, "draft_id": 0, "user_id": 1,
        "result": [{"original_width": 96, "original_height": 72, "image_rotation": 0,
                    "value": {"x": 49.44, "y": 59.97, "width": 0.32, "keypointlabels": ["Cat"]},
                    "is_positive": True, "id": "fBWv1t0S2L", "from_name": "kp", "to_name": "image",
                    "type": "keypointlabels", "origin": "manual"}]}},
}

PROJECT = {
    "id": 1, "title": "seg-e2e", "description": "", "label_config": CONFIG_XML,
    "parsed_label_config": {
        "bbox": {"type": "RectangleLabels", "to_name": ["image"],
                 "inputs": [{"type": "Image", "value": "image"}], "labels": ["Cat", "Dog"]},
        "poly": {"type": "PolygonLabels", "to_name": ["image"],
                 "inputs": [{"type": "Image", "value": "image"}], "labels": ["Cat", "Dog"]},
        "brush": {"type": "BrushLabels", "to_name": ["image"],
                  "inputs": [{"type": "Image", "value": "image"}], "labels": ["Cat", "Dog"]},
    },
    "expert_instruction": "", "show_instruction": False, "show_skip_button": True,
    "enable_empty_annotation": True, "show_annotation_history": False, "color": "#FFFFFF",
    "maximum_annotations": 1, "is_published": False, "model_version": "stub", "is_draft": False,
    "created_by": 1, "created_at": "2026-11-26T16:39:04.000000Z", "min_annotations_to_start_training": 1,
    "start_training_on_annotation_update": True, "show_collab_predictions": True,
    "num_tasks_with_annotations": 1, "task_number": 3, "useful_annotation_number": 1,
    "ground_truth_number": 0, "skipped_annotations_number": 0, "total_annotations_number": 1,
    "total_predictions_number": 0, "sampling": "Sequential sampling", "show_ground_truth_first": False,
    "show_overlap_first": False, "overlap_cohort_percentage": 100, "task_data_login": None,
    "task_data_password": None, "control_weights": {}, "evaluate_predictions_automatically": False,
    "skip_queue": "REQUEUE_FOR_OTHERS", "reveal_preannotations_interactively": False,
    "pinned_at": None, "finished_task_number": 1, "queue_total": 2, "queue_done": 1,
    "config_suitable_for_bulk_annotation": False, "workspace": None, "token": "b1c2d3e4",
}

WEBHOOK_ANNOTATION_CREATED = {
    "action": "ANNOTATION_CREATED",
    "annotation": ANNOTATION,
    "task": {k: v for k, v in _task(1, "/data/local-files/?d=images/local1.png").items()
             if k not in ("annotations", "predictions")},
    "project": PROJECT,
}

WEBHOOK_ANNOTATION_UPDATED = {
    "action": "ANNOTATION_UPDATED",
    "annotation": {**ANNOTATION, "result": [RECT_REGION, POLY_REGION, BRUSH_REGION], "result_count": 3,
                   "updated_at": "2026-11-26T16:42:10.000000Z"},
    "task": WEBHOOK_ANNOTATION_CREATED["task"],
    "project": PROJECT,
}

WEBHOOK_ANNOTATIONS_DELETED = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}], "project": PROJECT}

WEBHOOK_START_TRAINING = {"action": "START_TRAINING", "project": PROJECT}

WEBHOOK_TASKS_DELETED = {"action": "TASKS_DELETED", "tasks": [{"id": 2}], "project": PROJECT}

WEBHOOK_PROJECT_UPDATED = {"action": "PROJECT_UPDATED", "project": PROJECT}


# --------------------------------------------------------------------------- test double


class FakeHTTPServer:
    """A local HTTP server on 127.0.0.1 (random port) that answers scripted responses.

    `route(path, *responses)`: path includes the query string; each response is
    (status, headers, body) or a callable(request) -> such a tuple; they are used in order and the
    last one repeats. Every request is recorded as dict(method, path, headers, body).
    """

    def __init__(self):
        self.routes: dict[str, list] = {}
        self.requests: list[dict] = []
        self._http = RouteServer(self._serve)
        self.port = self._http.port
        self.url = self._http.url

    def _serve(self, request: Request) -> Reply:
        try:
            body = request.json()
        except ValueError:
            body = request.raw
        req = {"method": request.method, "path": request.target, "headers": dict(request.headers.items()),
               "body": body}
        self.requests.append(req)
        queue = self.routes.get(request.target)
        response = (404, {}, b"not found") if not queue else (queue.pop(0) if len(queue) > 1 else queue[0])
        status, headers, payload = response(req) if callable(response) else response
        if isinstance(payload, (dict, list)):
            return Reply(status, payload, JSON, headers)
        return Reply(status, payload, None, headers)

    def route(self, path: str, *responses) -> None:
        self.routes[path] = list(responses)

    def hits(self, path: str) -> list[dict]:
        return [r for r in self.requests if r["path"] == path]

    def close(self) -> None:
        self._http.close()
