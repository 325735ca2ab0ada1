"""The tasks of each project that we have processed, so a bank change can re-label them.

One store hash per project ("tasks:<pid>"): task id -> JSON TaskRecord. A record says where the
image is, which cached proposals belong to it, which Label Studio prediction holds our result
(when known) and a hash of the result last delivered, so a refresh posts only what changed.
Read-modify-write goes through a per-project lock so a refresh and a predict job do not lose each
other's fields.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace

from backend.storage.store import Store

@dataclass(frozen=True)
class TaskRecord:
    task_id: int
    image_url: str
    image_sha256: str | None = None
    proposal_key: str | None = None      # ProposalCache key; None until proposals were computed
    prediction_id: int | None = None     # our prediction in Label Studio, when we created/found it
    result_hash: str | None = None       # result_hash() of the last delivered result
    model_version: str | None = None     # model_version of the last delivered result


_FIELDS = {f.name for f in fields(TaskRecord)}


def result_hash(result: list[dict]) -> str:
    """Content hash of a prediction result, ignoring region ids (they are random per run)."""
    stripped = [{k: v for k, v in region.items() if k != "id"} for region in result]
    return hashlib.sha256(json.dumps(stripped, sort_keys=True).encode()).hexdigest()[:16]


class TaskRegistry:
    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def _key(pid: int) -> str:
        return f"tasks:{int(pid)}"

    @staticmethod
    def _decode(raw: bytes) -> TaskRecord:
        return TaskRecord(**json.loads(raw))

    def get(self, pid: int, task_id: int) -> TaskRecord | None:
        raw = self.store.hget(self._key(pid), str(int(task_id)))
        return self._decode(raw) if raw else None

    def get_many(self, pid: int, task_ids: list[int]) -> dict[int, TaskRecord]:
        """The registered ones of these tasks, by task id, read in one store round trip."""
        ids = [int(t) for t in task_ids]
        raws = self.store.hmget(self._key(pid), [str(t) for t in ids])
        return {tid: self._decode(raw) for tid, raw in zip(ids, raws) if raw}

    def all(self, pid: int) -> dict[int, TaskRecord]:
        """Every registered task of the project, by task id."""
        return {int(tid): self._decode(raw) for tid, raw in self.store.hgetall(self._key(pid)).items()}

    def update(self, pid: int, changes: dict[int, dict]) -> dict[int, TaskRecord]:
        """Merge field changes into several records at once (creating missing ones, which then
        need `image_url`); returns the merged records. Costs O(len(changes)): the changed
        records are read and written, never the rest of the project."""
        unknown = {k for ch in changes.values() for k in ch} - _FIELDS
        if unknown:
            raise ValueError(f"unknown task record fields {sorted(unknown)}")
        out: dict[int, TaskRecord] = {}
        with self.store.lock(self._key(pid), timeout=30, blocking_timeout=60):
            current_records = self.get_many(pid, list(changes))
            for tid, change in changes.items():
                current = current_records.get(int(tid))
                out[int(tid)] = (replace(current, **change) if current
                                 else TaskRecord(**{**change, "task_id": int(tid)}))
            self.store.hset(self._key(pid), {str(tid): json.dumps(asdict(rec)) for tid, rec in out.items()})
        return out

    def remove(self, pid: int, *task_ids: int) -> int:
        return self.store.hdel(self._key(pid), *(str(int(t)) for t in task_ids))
