"""The embedded queue's durable state: one SQLite table (WAL, one small row write per state change)
of the jobs queued, scheduled for a retry, running and done, trimmed to a history bound. Queued
jobs survive a restart; a job that was running when the process died is queued again.

One process owns the file (it holds `<file>.lock` for its lifetime): a second process on the same
MODEL_DIR would requeue the jobs the first is running, so it is refused with QueueInUse.
"""
from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from backend.queueing.jobinfo import QUEUES, TERMINAL

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    func TEXT NOT NULL,
    queue INTEGER NOT NULL,            -- index in QUEUES: the priority
    pos INTEGER NOT NULL,              -- place in its queue
    status TEXT NOT NULL,
    args TEXT NOT NULL,                -- JSON [args, kwargs]
    meta TEXT NOT NULL,
    result TEXT,                       -- JSON
    error TEXT,
    retries_left INTEGER NOT NULL,
    intervals TEXT NOT NULL,           -- JSON list of the backoff before each retry
    timeout INTEGER NOT NULL,
    run_at REAL,                       -- when a scheduled retry is due (epoch s)
    enqueued_at REAL NOT NULL,
    ended_at REAL,
    seq INTEGER NOT NULL               -- enqueue order, for the history
);
CREATE INDEX IF NOT EXISTS jobs_waiting ON jobs (status, queue, pos);
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq);
"""
_DONE = tuple(sorted(TERMINAL))
_OWNED: dict[str, int] = {}  # lock files this process holds (for its lifetime): path -> fd
_OWNED_LOCK = threading.Lock()


class QueueInUse(RuntimeError):
    """Another process owns the embedded queue's file."""


def own(path: Path) -> None:
    """Hold `<path>.lock` for the rest of this process (again and again: a no-op once held);
    QueueInUse when another process holds it."""
    lock_path = str(path) + ".lock"
    with _OWNED_LOCK:
        if lock_path in _OWNED:
            return
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise QueueInUse(f"{path} is in use by another process (pid {other}): the embedded queue (no REDIS_URL) "
                             "serves one process. Run one backend per MODEL_DIR, or set REDIS_URL to run "
                             "several processes") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _OWNED[lock_path] = fd


class JobDB:
    """Rows of the embedded jobs; every method is one short transaction under a lock (the worker
    thread, a job serving clicks, and web threads share one connection)."""

    def __init__(self, path: str | Path, history: int) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            own(Path(path))
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across a process crash; fsync at checkpoints
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._history = history

    def _one(self, sql: str, params: tuple = ()) -> sqlite3.Row | None:
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()  # all: an UPDATE ... RETURNING completes
        return rows[0] if rows else None

    def _write(self, sql: str, params: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, params).rowcount

    def add(self, job_id: str, func: str, queue: str, args: list, kwargs: dict, meta: dict,
            intervals: list[int], timeout: int, now: float) -> bool:
        """Queue a job; False (nothing written) when `job_id` is queued, scheduled or running (one
        process writes this file: the lock makes the check and the write one step)."""
        with self._lock:
            row = self._db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None and row["status"] not in TERMINAL:
                return False
            self._db.execute(
                "INSERT OR REPLACE INTO jobs (id, func, queue, pos, status, args, meta, retries_left, intervals,"
                " timeout, enqueued_at, seq) VALUES (?, ?, ?, (SELECT COALESCE(MAX(pos), 0) + 1 FROM jobs),"
                " 'queued', ?, ?, ?, ?, ?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs))",
                (job_id, func, QUEUES.index(queue), json.dumps([args, kwargs]), json.dumps(meta),
                 len(intervals), json.dumps(intervals), timeout, now))
            return True

    def claim(self, queue: str | None = None) -> sqlite3.Row | None:
        """Mark the first queued job (of `queue`, else of the first queue that has one) started
        and return its row; None when there is none."""
        where = "status = 'queued'" + (" AND queue = ?" if queue else "")
        params = (QUEUES.index(queue),) if queue else ()
        return self._one(f"UPDATE jobs SET status = 'started' WHERE id = (SELECT id FROM jobs WHERE {where}"
                         " ORDER BY queue, pos LIMIT 1) RETURNING *", params)

    def promote_due(self, now: float) -> float | None:
        """Queue the scheduled retries that are due (at the back of their queue, as RQ's scheduler
        does); returns when the next one is due, None if none is scheduled."""
        with self._lock:
            self._db.execute("UPDATE jobs SET status = 'queued', run_at = NULL, pos = (SELECT MAX(pos) + 1 FROM jobs)"
                             " WHERE status = 'scheduled' AND run_at <= ?", (now,))
            return self._db.execute("SELECT MIN(run_at) FROM jobs WHERE status = 'scheduled'").fetchone()[0]

    def finish(self, job_id: str, result: Any, now: float) -> None:
        self._write("UPDATE jobs SET status = 'finished', result = ?, ended_at = ? WHERE id = ?",
                    (json.dumps(result), now, job_id))
        self._trim()

    def fail(self, job_id: str, error: str, now: float) -> None:
        self._write("UPDATE jobs SET status = 'failed', error = ?, ended_at = ? WHERE id = ?", (error, now, job_id))
        self._trim()

    def schedule_retry(self, job_id: str, run_at: float) -> None:
        self._write("UPDATE jobs SET status = 'scheduled', retries_left = retries_left - 1, run_at = ?"
                    " WHERE id = ?", (run_at, job_id))

    def requeue_started(self) -> list[str]:
        """Put the jobs left "started" (their process died) back at the front of their queue,
        counting it in their meta "abandoned" as the RQ workers do; returns their ids."""
        with self._lock:
            rows = self._db.execute("SELECT id, meta FROM jobs WHERE status = 'started'").fetchall()
            for row in rows:
                meta = json.loads(row["meta"])
                meta["abandoned"] = int(meta.get("abandoned", 0)) + 1
                self._db.execute("UPDATE jobs SET status = 'queued', meta = ?,"
                                 " pos = (SELECT MIN(pos) - 1 FROM jobs) WHERE id = ?",
                                 (json.dumps(meta), row["id"]))
            return [row["id"] for row in rows]

    def merge_meta(self, job_id: str, fields: dict) -> None:
        with self._lock:
            row = self._db.execute("SELECT meta FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None:
                meta = {**json.loads(row["meta"]), **fields}
                self._db.execute("UPDATE jobs SET meta = ? WHERE id = ?", (json.dumps(meta), job_id))

    def get(self, job_id: str) -> sqlite3.Row | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def recent(self, limit: int) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()

    def queued_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT queue, COUNT(*) FROM jobs WHERE status = 'queued' GROUP BY queue")
            counts = dict(rows.fetchall())
        return {name: counts.get(i, 0) for i, name in enumerate(QUEUES)}

    def has_work(self) -> bool:
        return self._one("SELECT 1 FROM jobs WHERE status IN ('queued', 'scheduled') LIMIT 1") is not None

    def _trim(self) -> None:
        """Forget the oldest done jobs beyond the history bound (waiting and running ones are kept)."""
        marks = ", ".join("?" * len(_DONE))
        self._write(f"DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE status IN ({marks}) ORDER BY seq"
                    " LIMIT MAX(0, (SELECT COUNT(*) FROM jobs) - ?))", (*_DONE, self._history))
