"""/predict's job as the web queues it: ids, the image URL and the label config's hash, never the
task itself (backend.storage.label_configs holds the XML under its hash).

Adapter only (issue #12): it rebuilds the arguments the job code in backend/jobs/__init__.py still
takes (a task dict and the config XML) and calls it.
"""
from __future__ import annotations

from backend import jobs, runtime
from backend.regions.label_config import parse_label_config
from backend.storage import label_configs


def task_and_config(task_id: int, image_url: str, config_hash: str) -> tuple[dict, str]:
    """({"id", "data": {<image key>: url}}, XML) of what the web queued."""
    xml = label_configs.get(runtime.get_store(), config_hash)
    return {"id": int(task_id), "data": {parse_label_config(xml).value_key: image_url}}, xml


def predict_task(pid: int, task_id: int, image_url: str, config_hash: str, delivery_key: str | None = None,
                 warm: bool = False) -> dict:
    """backend.jobs.predict_task of one task."""
    task, xml = task_and_config(task_id, image_url, config_hash)
    return jobs.predict_task(pid, task, xml, delivery_key, warm=warm)
