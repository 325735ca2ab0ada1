"""Jobs queued by the release before the jobs/ package (in Redis, or in the webhook spool) still
run after an upgrade.

Most of them only moved (backend.queueing.execution.MOVED_JOBS maps their old paths). Three took
the whole Label Studio task and the label config XML; these adapters turn those arguments into
today's (task id, image URL, config hash) and run today's job.
"""
from __future__ import annotations

from backend import runtime
from backend.jobs import interactive, predict
from backend.jobs.inference import image_url
from backend.regions.label_config import parse_label_config
from backend.storage import label_configs


def _task(task: dict, label_config: str) -> tuple[int, str]:
    """(task id, image URL) of an old job's task."""
    return int(task["id"]), image_url(task, parse_label_config(label_config))


def _stored(label_config: str) -> str:
    """The hash today's jobs read the XML back by."""
    return label_configs.put(runtime.get_store(), label_config)


def predict_task(pid: int, task: dict, label_config: str, delivery_key: str | None = None,
                 warm: bool = False) -> dict:
    return predict.predict_task(pid, *_task(task, label_config), _stored(label_config), delivery_key, warm)


def segment_task(pid: int, task: dict, label_config: str, prompt: dict, expires_at: float | None = None) -> dict:
    return interactive.segment_task(pid, *_task(task, label_config), _stored(label_config), prompt, expires_at)


def warm_task(pid: int, task: dict, label_config: str) -> dict:
    return interactive.warm_task(pid, *_task(task, label_config))
