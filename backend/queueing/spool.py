"""The webhook spool: jobs that arrive while Redis is down are appended to a durable file (`Spool`,
jsonl + fsync under MODEL_DIR/spool) and enqueued in order by `SpoolReplayer` once Redis answers."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from backend import queueing, runtime
from backend.queueing.jobinfo import QueueUnavailable
from backend.settings import Settings
from model.atomic import atomic_write

log = logging.getLogger("backend.queueing")

class Spool:
    """Durable FIFO of jobs that could not be enqueued (Redis down): one JSON line per job.

    Appends are fsynced before the caller answers, so an accepted webhook survives a crash of the
    web process. A lock file (flock) serialises appends and replays across processes (gunicorn
    workers). Replay stops at the first job Redis refuses and keeps it and everything after it,
    so order is kept; a job enqueued twice after a crash mid-replay is harmless (jobs are idempotent).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / "jobs.jsonl"
        self._lock_path = self.directory / "spool.lock"

    def _locked(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    @staticmethod
    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def append(self, func_path: str, args: list, queue: str, **enqueue_kwargs: Any) -> None:
        """Keep a job that could not be queued; `enqueue_kwargs` (timeout, meta, ...) are given to
        `enqueue` as they are when it is replayed."""
        line = json.dumps({"func": func_path, "args": args, "queue": queue, "kwargs": enqueue_kwargs,
                           "spooled_at": time.time()}) + "\n"
        fd = self._locked()
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        finally:
            self._unlock(fd)

    def __len__(self) -> int:
        try:
            with open(self.path, encoding="utf-8") as f:
                return sum(1 for ln in f if ln.strip())
        except FileNotFoundError:
            return 0

    def pending(self) -> bool:
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def replay(self, submit: Callable[[dict], None]) -> int:
        """Submit spooled jobs in order; returns how many left the spool."""
        fd = self._locked()
        try:
            try:
                lines = [ln for ln in self.path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            except FileNotFoundError:
                return 0
            done = 0
            try:
                for ln in lines:
                    try:
                        record = json.loads(ln)
                    except ValueError:  # a torn last line from a crash mid-append: drop it
                        log.warning("spool: dropping an unreadable line")
                        done += 1
                        continue
                    try:
                        submit(record)
                    except QueueUnavailable:
                        break
                    done += 1
            finally:
                atomic_write(self.path, "".join(ln + "\n" for ln in lines[done:]))
            return done
        finally:
            self._unlock(fd)


def submit_spooled(record: dict) -> None:
    """Enqueue one spooled record (raises QueueUnavailable while Redis is still down)."""
    queueing.enqueue(record["func"], *record["args"], queue=record["queue"], **record.get("kwargs", {}))


class SpoolReplayer:
    """Background thread of the web process: every `interval` s, refresh the queue health snapshot
    (so /health never waits on a slow Redis) and, when Redis answers, replay the spool.

    It serves the app created with `settings` and ends once the process settings are replaced
    (runtime.configure/reset: tests build several apps in one process).
    """

    def __init__(self, spool: Spool, settings: Settings, interval: float = 1.0) -> None:
        self.spool = spool
        self.settings = settings
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()  # start() runs from every request's before_request
        self.replayed = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="ntt-spool-replay", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def run_once(self) -> int:
        if not queueing.health(max_age=0).get("ok") or not self.spool.pending():
            return 0
        n = self.spool.replay(submit_spooled)
        if n:
            self.replayed += n
            log.info("spool: %d spooled job(s) enqueued", n)
        return n

    def _run(self) -> None:
        while not self._stop.wait(self.interval) and runtime.get_settings() is self.settings:
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - keep the thread alive; the next round retries
                log.exception("spool replay failed")
