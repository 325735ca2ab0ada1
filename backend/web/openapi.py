"""OpenAPI 3.0 description of the backend's HTTP routes (served at GET /openapi.json).

It documents what Label Studio sends and what operators may call, so that clients, proxies and
the property-based route fuzzer (tests/reliability/test_fuzz_routes.py) share one source. Only the
fields the backend reads are declared; every object tolerates extra keys (LS adds fields between
releases). Every error is `{"error": "..."}` with a 4xx status (503 while Redis is down).
"""
from __future__ import annotations

import copy
from typing import Any

# The Label Studio webhook actions the backend handles (any other is answered 200 and ignored).
WEBHOOK_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED",
                  "START_TRAINING", "PROJECT_UPDATED", "TASKS_DELETED")

_PROJECT_UID = {"oneOf": [{"type": "string", "pattern": r"^\d{1,18}(\.\d+)?$"},
                          {"type": "integer", "minimum": 0}],
                "description": "Label Studio project uid \"<project id>.<created_at>\" (or the bare id)."}

_SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"],
              "properties": {"error": {"type": "string"}}},
    "Task": {
        "type": "object", "required": ["id", "data"],
        "properties": {
            "id": {"type": "integer", "minimum": 0},
            "data": {"type": "object", "additionalProperties": {"type": "string"},
                     "description": "Task data; the Image tag's value names the key holding the image URL "
                                    "(/data/upload/…, /data/local-files/?d=…, http(s)://…, s3://…)."},
            "project": {"type": "integer"},
            "annotations": {"type": "array", "items": {"type": "object"}},
            "predictions": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Region": {
        "type": "object", "required": ["type", "value"],
        "properties": {
            "id": {"type": "string"},
            "from_name": {"type": "string"},
            "to_name": {"type": "string"},
            "type": {"type": "string", "enum": ["rectanglelabels", "polygonlabels", "brushlabels"]},
            "original_width": {"type": "integer", "minimum": 1},
            "original_height": {"type": "integer", "minimum": 1},
            "image_rotation": {"type": "number"},
            "score": {"type": "number"},
            "value": {"type": "object", "properties": {
                "x": {"type": "number"}, "y": {"type": "number"},
                "width": {"type": "number"}, "height": {"type": "number"}, "rotation": {"type": "number"},
                "points": {"type": "array", "items": {"type": "array", "items": {"type": "number"},
                                                      "minItems": 2, "maxItems": 2}},
                "format": {"type": "string", "enum": ["rle"]},
                "rle": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
                "rectanglelabels": {"type": "array", "items": {"type": "string"}},
                "polygonlabels": {"type": "array", "items": {"type": "string"}},
                "brushlabels": {"type": "array", "items": {"type": "string"}},
            }},
        },
    },
    "Annotation": {
        "type": "object", "required": ["id"],
        "properties": {
            "id": {"type": "integer"},
            "task": {"type": "integer"},
            "project": {"type": "integer"},
            "was_cancelled": {"type": "boolean"},
            "result": {"type": "array", "items": {"$ref": "#/components/schemas/Region"}},
        },
    },
    "Project": {
        "type": "object", "required": ["id"],
        "properties": {"id": {"type": "integer", "minimum": 0}, "label_config": {"type": "string"}},
    },
    "PredictionItem": {
        "type": "object",
        "description": "A prediction (`result`, `score`, `model_version`), or a per-task `error`; an item "
                       "without `result` is skipped by Label Studio, so the task is predicted again next time.",
        "properties": {
            "result": {"type": "array", "items": {"$ref": "#/components/schemas/Region"}},
            "score": {"type": "number"},
            "model_version": {"type": "string"},
            "error": {"type": "string"},
            "status": {"type": "string", "enum": ["deferred"]},
            "job": {"type": "string"},
            "detail": {"type": "string"},
        },
    },
    "InteractiveContext": {
        "type": "object", "nullable": True,
        "description": "The regions an annotator just drew with a smart tool (Label Studio sends only those).",
        "properties": {"result": {"type": "array", "items": {
            "type": "object", "required": ["type", "value"],
            "properties": {
                "type": {"type": "string", "enum": ["keypointlabels", "rectanglelabels"]},
                "from_name": {"type": "string"}, "to_name": {"type": "string"},
                "original_width": {"type": "integer"}, "original_height": {"type": "integer"},
                "is_positive": {"type": "boolean", "description": "false: a negative click (Alt); default true"},
                "value": {"type": "object", "required": ["x", "y"], "properties": {
                    "x": {"type": "number"}, "y": {"type": "number"},
                    "width": {"type": "number"}, "height": {"type": "number"},
                    "keypointlabels": {"type": "array", "items": {"type": "string"}},
                    "rectanglelabels": {"type": "array", "items": {"type": "string"}},
                    "labels": {"type": "array", "items": {"type": "string"}}}},
            }}}},
    },
    "Job": {
        "type": "object", "required": ["id", "status"],
        "properties": {"id": {"type": "string"}, "func": {"type": "string"}, "status": {"type": "string"},
                       "meta": {"type": "object"}, "error": {"type": "string", "nullable": True},
                       "enqueued_at": {"type": "string", "nullable": True},
                       "ended_at": {"type": "string", "nullable": True}, "result": {}},
    },
}


def _json(schema: dict, description: str = "") -> dict:
    return {"description": description or "JSON", "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


_ERRORS = {
    "400": _json(_ref("Error"), "Malformed or unsupported input; the message says what is wrong."),
    "401": _json(_ref("Error"), "Basic auth is configured and the request lacks valid credentials."),
    "413": _json(_ref("Error"), "Body larger than MAX_REQUEST_MB."),
}
_UNAVAILABLE = {"503": _json(_ref("Error"), "Redis (the shared store) is unavailable; retry later.")}

_PROJECT_QUERY = {"name": "project", "in": "query", "required": True, "schema": _PROJECT_UID}
_NO_EVALUATION = _json(_ref("Error"), "Project never set up, or no evaluation yet.")

_PATHS: dict[str, Any] = {
    "/": {"get": {"operationId": "root", "summary": "Same as /health.",
                  "responses": {"200": _json({"type": "object"}, "Status."), "401": _ERRORS["401"]}}},
    "/health": {"get": {
        "operationId": "health",
        "summary": "Liveness and queue status; always 200 and fast (reads a snapshot), also while Redis is down.",
        "responses": {"200": _json({"type": "object", "required": ["status"], "properties": {
            "status": {"type": "string", "enum": ["UP"]}, "model_class": {"type": "string"},
            "model": {"type": "string"}, "ready": {"type": "boolean"},
            "redis": {"type": "string", "enum": ["ok", "degraded", "disabled"]},
            "queue": {"type": "object"}}}, "Status."), "401": _ERRORS["401"]}}},
    "/setup": {"post": {
        "operationId": "setup",
        "summary": "Validate and store the project's label config (and LS connection); return model_version.",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["project", "schema"],
            "properties": {"project": _PROJECT_UID, "schema": {"type": "string"},
                           "hostname": {"type": "string"}, "access_token": {"type": "string"},
                           "extra_params": {"type": "object", "nullable": True},
                           "model_version": {"type": "string", "nullable": True}}}}}},
        "responses": {"200": _json({"type": "object", "required": ["model_version"],
                                    "properties": {"model_version": {"type": "string"}}}, "Current version."),
                      **_ERRORS, **_UNAVAILABLE}}},
    "/predict": {"post": {
        "operationId": "predict",
        "summary": "One item per task, same order; per-task errors never fail the batch.",
        "description": "With a non-empty `params.context.result` (an editor click forwarded by Label Studio's "
                       "interactive pre-annotations) the call is interactive: one task, answered with the mask "
                       "of the smart-tool prompts as one item (regions of the config's BrushLabels, else "
                       "PolygonLabels control, with the prompt's label), computed ahead of any batch work.",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["tasks"],
            "properties": {"tasks": {"type": "array", "items": _ref("Task")}, "project": _PROJECT_UID,
                           "label_config": {"type": "string"},
                           "params": {"type": "object", "nullable": True, "properties": {
                               "context": _ref("InteractiveContext")}}}}}}},
        "responses": {"200": _json({"type": "object", "required": ["results"], "properties": {
            "results": {"type": "array", "items": _ref("PredictionItem")}}}, "Predictions."), **_ERRORS}}},
    "/webhook": {"post": {
        "operationId": "webhook",
        "summary": "Label Studio event; queued as a bank job and answered at once.",
        "description": "A hint, not a source of truth: the job reads the project, the annotation and its task "
                       "back from Label Studio with the backend's own credentials and acts on what LS holds; "
                       "deleted annotations and tasks are forgotten only once LS no longer has them.",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["action"],
            "properties": {
                "action": {"type": "string", "enum": list(WEBHOOK_EVENTS),
                           "description": "Handled events; any other action is answered 200 and ignored."},
                "project": _ref("Project"), "annotation": _ref("Annotation"), "task": _ref("Task"),
                "annotations": {"type": "array", "items": _ref("Annotation")},
                "tasks": {"type": "array", "items": {"type": "object", "required": ["id"],
                                                     "properties": {"id": {"type": "integer"}}}}}}}}},
        "responses": {
            "200": _json({"type": "object", "properties": {"status": {"type": "string"}}}, "Unknown event, ignored."),
            "201": _json({"type": "object", "properties": {"status": {"type": "string"}, "job": {"type": "string"}}},
                         "Queued."),
            "202": _json({"type": "object", "properties": {"status": {"type": "string", "enum": ["spooled"]}}},
                         "Redis is down: kept in the durable spool, queued when Redis is back."),
            "503": _json(_ref("Error"), "Redis is down and the spool cannot be written: the event is lost."),
            **_ERRORS}}},
    "/versions": {"get": {
        "operationId": "versions",
        "summary": "The project's current model_version (JSON body or ?project=); without a project, "
                   "those of every project known.",
        "parameters": [{"name": "project", "in": "query", "required": False, "schema": _PROJECT_UID}],
        "responses": {"200": _json({"type": "object", "properties": {
            "versions": {"type": "array", "items": {"type": "string"}}}}, "Versions."),
            **_ERRORS, **_UNAVAILABLE}}},
    "/evaluation": {
        "get": {
            "operationId": "evaluation",
            "summary": "The project's last evaluation on its own annotations (leave-one-task-out): status "
                       "(running while one is queued or runs, else done), classes keyed by label (ap, ap50, "
                       "mask_ap, precision, recall, f1, threshold, references, pr, histogram), the variant in "
                       "use, the learning curve, confusion and worst misses.",
            "parameters": [_PROJECT_QUERY],
            "responses": {"200": _json({"type": "object", "required": ["status", "classes"], "properties": {
                "status": {"type": "string", "enum": ["running", "done"]},
                "classes": {"type": "object", "additionalProperties": {"type": "object"}},
                "variant_in_use": {"type": "string"}, "curve": {"type": "array", "items": {"type": "object"}}}},
                "The last result."), "404": _NO_EVALUATION, **_ERRORS, **_UNAVAILABLE}},
        "post": {
            "operationId": "evaluate",
            "summary": "Queue an evaluation of the project (after every waiting prediction); one at a time.",
            "parameters": [_PROJECT_QUERY],
            "responses": {"202": _json({"type": "object", "properties": {
                "status": {"type": "string", "enum": ["queued", "already queued"]},
                "job": {"type": "string", "nullable": True}}}, "Queued (or one was queued already)."),
                "404": _json(_ref("Error"), "Project never set up."), **_ERRORS, **_UNAVAILABLE}}},
    "/report": {"get": {
        "operationId": "report",
        "summary": "The last evaluation as one self-contained HTML page (inline SVG charts, thumbnails as "
                   "data: URIs, no script).",
        "parameters": [_PROJECT_QUERY],
        "responses": {"200": {"description": "HTML page.", "content": {"text/html": {"schema": {"type": "string"}}}},
                      "404": _NO_EVALUATION, **_ERRORS, **_UNAVAILABLE}}},
    "/metrics": {"get": {"operationId": "metrics", "summary": "Process counters.",
                         "responses": {"200": _json({"type": "object"}, "Counters."), "401": _ERRORS["401"]}}},
    "/jobs": {"get": {
        "operationId": "jobs", "summary": "Recent jobs with progress meta, or one job (?id=).",
        "parameters": [{"name": "id", "in": "query", "required": False, "schema": {"type": "string"}},
                       {"name": "limit", "in": "query", "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500}}],
        "responses": {"200": _json({"oneOf": [_ref("Job"), {"type": "object", "required": ["jobs"], "properties": {
            "jobs": {"type": "array", "items": _ref("Job")}}}]}, "Jobs."),
            "404": _json(_ref("Error"), "Unknown or expired job."), **_ERRORS, **_UNAVAILABLE}}},
    "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document.",
                              "responses": {"200": _json({"type": "object"}, "OpenAPI 3.0."),
                                            "401": _ERRORS["401"]}}},
}


def spec(auth: bool = False) -> dict:
    """The OpenAPI document; `auth` adds the HTTP Basic security requirement to every route."""
    doc = {
        "openapi": "3.0.3",
        "info": {"title": "NTT Label Studio ML backend", "version": "1",
                 "description": "SAM2 + DINOv2 reference-based pre-annotation (Label Studio ML backend protocol)."},
        "paths": copy.deepcopy(_PATHS),
        "components": {"schemas": copy.deepcopy(_SCHEMAS),
                       "securitySchemes": {"basic": {"type": "http", "scheme": "basic"}}},
    }
    if auth:
        doc["security"] = [{"basic": []}]
    return doc
