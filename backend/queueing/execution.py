"""The one way a job runs, in an RQ worker, inline in a long job, or on the embedded worker thread:
import the function by path, call it with its arguments (JSON data already: `enqueue` checked them
and both modes store them as JSON), keep the JSON copy of its result (a result that is not JSON
data fails the job with the same TypeError in both modes)."""
from __future__ import annotations

import importlib
from typing import Any, Callable

from rq.job import Job
from rq.timeouts import JobTimeoutException, TimerDeathPenalty

from backend.queueing.jobinfo import json_data


# Job paths of the release before the jobs/ package -> today's, so that jobs it queued in Redis or
# spooled still run after an upgrade (backend/jobs/upgrade.py adapts the arguments that changed).
MOVED_JOBS = {
    "backend.jobs.apply_webhook": "backend.jobs.webhook.apply_webhook",
    "backend.jobs.rebuild_bank": "backend.jobs.bank.rebuild_bank",
    "backend.jobs.train_project": "backend.jobs.train.train_project",
    "backend.jobs.refresh_project": "backend.jobs.refresh.refresh_project",
    "backend.evaluation_job.evaluate_project": "backend.jobs.evaluation.evaluate_project",
    "backend.jobs.predict_task": "backend.jobs.upgrade.predict_task",
    "backend.jobs.segment_task": "backend.jobs.upgrade.segment_task",
    "backend.jobs.warm_task": "backend.jobs.upgrade.warm_task",
}


def import_func(func_path: str) -> Callable:
    """The function named by "package.module.name" (job functions are referenced by path, so the
    web process never imports torch), or by its path in an older release (MOVED_JOBS)."""
    module, _, name = MOVED_JOBS.get(func_path, func_path).rpartition(".")
    return getattr(importlib.import_module(module), name)


def perform(func_path: str, args: Any, kwargs: Any, timeout: int | None = None) -> Any:
    """Run one job; with `timeout` (s), raise rq's JobTimeoutException in the calling thread once it
    has run that long (rq's TimerDeathPenalty; an RQ worker enforces its own timeout around this)."""
    func = import_func(func_path)
    if timeout is None:
        result = func(*args, **kwargs)
    else:
        with death_penalty(timeout):
            result = func(*args, **kwargs)
    return json_data(result, "a job's result")


def death_penalty(timeout: int) -> TimerDeathPenalty:
    """rq's TimerDeathPenalty, raising a JobTimeoutException of its own class: it writes its timeout
    into the class it raises, which would give a job nested in another (a click served inline) the
    outer job's message, or the outer job the click's."""
    return TimerDeathPenalty(timeout, type("JobTimeoutException", (JobTimeoutException,), {}))


class JSONJob(Job):
    """An RQ job run through `perform` (rq would store a placeholder for a result that is not JSON)."""

    def _execute(self) -> Any:
        return perform(self.func_name, self.args, self.kwargs)
