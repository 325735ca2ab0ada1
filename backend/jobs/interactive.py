"""The interactive jobs as the web queues them (ids, image URL, label config hash).

Adapter only (issue #12): rebuilds the task dict and XML that backend/jobs/__init__.py still takes.
"""
from __future__ import annotations

from backend import jobs
from backend.jobs.predict import task_and_config


def segment_task(pid: int, task_id: int, image_url: str, config_hash: str, prompt: dict,
                 expires_at: float | None = None) -> dict:
    """backend.jobs.segment_task of one click/box."""
    task, xml = task_and_config(task_id, image_url, config_hash)
    return jobs.segment_task(pid, task, xml, prompt, expires_at)


def warm_task(pid: int, task_id: int, image_url: str, config_hash: str) -> dict:
    """backend.jobs.warm_task of an opened task."""
    task, xml = task_and_config(task_id, image_url, config_hash)
    return jobs.warm_task(pid, task, xml)
