"""What only the embedded SQLite store promises (test_store.py runs the shared contract on it):
every key survives a restart or a killed process, a registry write costs the same few pages
however big the project, locks and claims hold across processes, and the old JSON state is imported."""
from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from backend.storage.legacy_state import IMPORTED, import_json_state
from backend.storage.sqlite_store import SQLiteStore
from backend.storage.store import LockTimeout
from backend.storage.tasks_registry import TaskRegistry
from tests.helpers import claim_race

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def run_other(path: Path, code: str) -> subprocess.Popen:
    """Another python process with `store` opened on `path`, after it ran `code`; it waits to be killed."""
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys\nfrom backend.storage.sqlite_store import SQLiteStore\n"
                             "store = SQLiteStore(sys.argv[1])\n" + code +
                             "\nprint('ready', flush=True)\nsys.stdin.read()\n", str(path)],
                            cwd=ROOT, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def test_every_key_survives_a_restart(tmp_path):
    clock = FakeClock()
    path = tmp_path / "state" / "store.sqlite3"
    a = SQLiteStore(path, clock=clock)
    a.set_many({"bank:7:data": b"\x01\x02", "bank:7:version": "v1"})
    a.hset("tasks:7", {"42": '{"x": 1}', "43": "{}"})
    a.hdel("tasks:7", "43")
    a.sadd("bank:projects", "7", "8")
    a.set("engine", "e")
    a.set("deliver:1", "web", ttl=60)
    a.close()
    b = SQLiteStore(path, clock=clock)
    assert (b.get("bank:7:data"), b.get("bank:7:version"), b.get("engine")) == (b"\x01\x02", b"v1", b"e")
    assert b.hgetall("tasks:7") == {"42": b'{"x": 1}'}
    assert b.smembers("bank:projects") == {"7", "8"}
    assert b.get("deliver:1") == b"web"
    clock.now += 61
    assert b.get("deliver:1") is None  # the TTL survived too
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith("store.sqlite3")] == []


def test_writes_of_a_killed_process_are_kept(tmp_path):
    path = tmp_path / "store.sqlite3"
    proc = run_other(path, "store.hset('tasks:1', {'5': 'rec'})\nstore.set('bank:1:version', 'v9')")
    kill(proc)  # no close, no checkpoint: what it committed is in the WAL
    store = SQLiteStore(path)
    assert store.hget("tasks:1", "5") == b"rec" and store.get("bank:1:version") == b"v9"


def wal_bytes_of_one_registry_write(path: Path, records: int) -> int:
    """Bytes the WAL grows by when one record of a project of `records` records is updated (the
    whole write: the project lock taken, the record upserted, the lock released)."""
    registry = TaskRegistry(SQLiteStore(path))
    registry.update(1, {t: {"image_url": f"/data/upload/1/{t:06d}.png", "proposal_key": f"{t:064x}"}
                        for t in range(records)})
    with sqlite3.connect(path) as other:  # move the WAL into the database, empty the WAL file
        assert other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size == 0
    registry.update(1, {records // 2: {"prediction_id": 123456, "result_hash": "0123456789abcdef"}})
    assert registry.get(1, records // 2).prediction_id == 123456
    return wal.stat().st_size


def test_a_registry_write_costs_a_few_pages_whatever_the_project_size(tmp_path):
    """The old store rewrote a project's whole hash per write (O(N)); here one record write is a
    few page frames in the WAL, the same for 50 records as for 5,000 (about 1.3 MB of records)."""
    page = sqlite3.connect(":memory:").execute("PRAGMA page_size").fetchone()[0]
    frames = 8 * (page + 24) + 32  # 8 pages with their frame headers, plus the WAL header
    small = wal_bytes_of_one_registry_write(tmp_path / "small.sqlite3", 50)
    large = wal_bytes_of_one_registry_write(tmp_path / "large.sqlite3", 5000)
    assert 0 < small <= frames and 0 < large <= frames, (small, large)


def test_claims_and_locks_across_processes(tmp_path):
    path = tmp_path / "store.sqlite3"
    store = SQLiteStore(path)
    proc = run_other(path, "assert store.claim('deliver:1', 'api') == 'api'\n"
                           "held = store.lock('L', timeout=3600)\nheld.__enter__()")
    assert store.claim("deliver:1", "web") == "api"
    with pytest.raises(LockTimeout):  # the other process holds it, and is alive
        with store.lock("L", blocking_timeout=0.1):
            pass
    kill(proc)
    with store.lock("L", blocking_timeout=0.1):  # its holder is gone: taken over at once
        pass


def test_lock_of_a_holder_elsewhere_expires(tmp_path):
    """A holder on another host (pid not checkable) keeps the lock until its `timeout` passes."""
    clock = FakeClock()
    store = SQLiteStore(tmp_path / "store.sqlite3", clock=clock)
    with sqlite3.connect(tmp_path / "store.sqlite3") as other:
        other.execute("INSERT INTO locks VALUES ('L', 'x', 'elsewhere', ?, ?)", (os.getpid() + 1, clock.now + 60))
    with pytest.raises(LockTimeout):
        with store.lock("L", blocking_timeout=0.05):
            pass
    clock.now += 60
    with store.lock("L", blocking_timeout=0.05):
        pass


def test_claim_race_between_two_stores_on_one_file(tmp_path):
    winners = claim_race([SQLiteStore(tmp_path / "store.sqlite3") for _ in range(2)])
    assert len(winners) == 8 and len(set(winners)) == 1


def old_state_file(folder: Path, name: str, doc: dict) -> None:
    """A file as the store before SQLiteStore wrote it (one per key group)."""
    folder.mkdir(parents=True, exist_ok=True)
    b64 = lambda v: base64.b64encode(v).decode()  # noqa: E731
    (folder / name).write_text(json.dumps({
        key: {"t": "s", "v": b64(v)} if isinstance(v, bytes) else
             {"t": "h", "v": {f: b64(x) for f, x in v.items()}} if isinstance(v, dict) else
             {"t": "z", "v": sorted(v)}
        for key, v in doc.items()}))


def test_old_json_state_is_imported_once(tmp_path, caplog):
    folder = tmp_path / "state"
    old_state_file(folder, "bank%3A7.json", {"bank:7:data": b"\x00\xff", "bank:7:version": b"v1",
                                              "bank:projects": {"7"}})
    old_state_file(folder, "tasks%3A7.json", {"tasks:7": {"42": b'{"task_id": 42}'}})
    (folder / "broken.json").write_text("{not json")
    store = SQLiteStore(folder / "store.sqlite3")
    assert import_json_state(store, folder) == 4
    assert store.get("bank:7:data") == b"\x00\xff" and store.get("bank:7:version") == b"v1"
    assert store.smembers("bank:projects") == {"7"}
    assert store.hgetall("tasks:7") == {"42": b'{"task_id": 42}'}
    assert sorted(p.name for p in (folder / IMPORTED).iterdir()) == ["bank%3A7.json", "tasks%3A7.json"]
    assert (folder / "broken.json").exists() and "broken.json not imported" in caplog.text
    store.set("bank:7:version", "v2")
    assert import_json_state(store, folder) == 0  # nothing left to import: later writes stay
    assert store.get("bank:7:version") == b"v2"
