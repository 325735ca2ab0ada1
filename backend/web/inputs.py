"""Reading what a request sends: its JSON body, project ids, tasks. Bad input raises BadRequest (400)."""
from __future__ import annotations

import json
from typing import Any

from flask import request
from werkzeug.exceptions import RequestEntityTooLarge

from backend.errors import BadRequest


def json_body(required: bool = True) -> Any:
    """The request body as JSON (any content type); BadRequest when malformed."""
    raw = request.get_data(cache=True)  # 413 past MAX_CONTENT_LENGTH when Content-Length says so
    limit = request.max_content_length
    if (request.content_length is None and limit is not None and len(raw) >= limit
            and request.environ["wsgi.input"].read(1)):
        raise RequestEntityTooLarge()  # chunked body: werkzeug stops reading at the limit silently
    if not raw or not raw.strip():
        if required:
            raise BadRequest("request body must be a JSON object")
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"malformed JSON: {str(exc)[:200]}") from None


def json_object() -> dict:
    """The request body, which must be a JSON object."""
    body = json_body()
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def project_id(value: Any, where: str = "project") -> int:
    """'7.1717000000' (LS '<id>.<created_at>'), 7 or '7' -> 7."""
    if isinstance(value, bool) or value is None:
        raise BadRequest(f"missing or invalid '{where}'; expected \"<project id>.<timestamp>\"")
    text = str(value).split(".")[0].strip()
    if not text.isdigit() or len(text) > 18:
        raise BadRequest(f"invalid '{where}' {str(value)[:40]!r}; expected \"<project id>.<timestamp>\"")
    return int(text)


def task_error(task: Any, value_key: str) -> str | None:
    """Why this task cannot be predicted (None if it can)."""
    if not isinstance(task, dict):
        return "task is not a JSON object"
    task_id = task.get("id")
    if task_id is None:
        return "task has no 'id'"
    if isinstance(task_id, bool) or not (isinstance(task_id, int) or str(task_id).strip().isdigit()):
        return f"task id {str(task_id)[:40]!r} is not an integer"
    data = task.get("data")
    if not isinstance(data, dict):
        return f"task {task_id} has no 'data' object"
    if not isinstance(data.get(value_key), str) or not data[value_key].strip():
        return f"task {task_id} has no image URL in data['{value_key}']"
    return None
