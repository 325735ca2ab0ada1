"""BankStore: atomic per-project updates, cheap versions, persistence, project settings."""
from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

from backend.storage.bank_store import EMPTY_VERSION, BankStore
from backend.storage.sqlite_store import SQLiteStore
from backend.storage.store import RedisStore
from model.bank import MemoryBank


@pytest.fixture(params=["redis", "sqlite"])
def store(request, tmp_path):
    if request.param == "sqlite":
        yield SQLiteStore(tmp_path / "state" / "store.sqlite3")
        return
    prefix = f"ntt-test-{uuid.uuid4().hex[:10]}:"
    s = RedisStore("redis://127.0.0.1:6379/0", prefix=prefix)
    yield s
    keys = list(s.redis.scan_iter(match=prefix + "*"))
    if keys:
        s.redis.delete(*keys)


def vec(seed: int, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def test_empty_project(store):
    banks = BankStore(store)
    assert banks.version(1) == EMPTY_VERSION == "empty"
    assert len(banks.get(1)) == 0
    assert banks.label_config(1) is None
    assert banks.ls_connection(1) == (None, None)


def test_update_writes_bank_and_version(store):
    banks = BankStore(store)
    v1 = banks.update(3, lambda b: b.add("cat", "a1:r1", vec(1), group="a1"))
    assert v1 != EMPTY_VERSION
    assert banks.version(3) == v1
    bank = banks.get(3)
    assert len(bank) == 1 and bank.classes == ["cat"]
    np.testing.assert_array_equal(bank.refs("cat")[0].descriptor, vec(1))
    assert banks.version(4) == EMPTY_VERSION  # projects are separate
    # a second BankStore on the same store (another process) sees the same bank
    assert BankStore(store).get(3).version == v1
    # a no-op edit keeps the version
    assert banks.update(3, lambda b: b.remove("nope")) == v1
    v2 = banks.update(3, lambda b: b.remove_group("a1"))
    assert v2 == EMPTY_VERSION and len(banks.get(3)) == 0


def test_exception_inside_update_keeps_old_bank(store):
    banks = BankStore(store)
    v1 = banks.update(5, lambda b: b.add("cat", "r1", vec(1)))

    def broken(bank: MemoryBank) -> None:
        bank.add("dog", "r2", vec(2))
        bank.remove("r1")
        raise RuntimeError("worker died mid-update")

    with pytest.raises(RuntimeError):
        banks.update(5, broken)
    assert banks.version(5) == v1
    assert [r.ref_id for r in BankStore(store).get(5).refs("cat")] == ["r1"]
    assert BankStore(store).get(5).classes == ["cat"]
    # the lock was released: the next update goes through
    banks.update(5, lambda b: b.add("dog", "r2", vec(2)))
    assert sorted(BankStore(store).get(5).classes) == ["cat", "dog"]


def test_concurrent_updates_from_two_threads_are_all_applied(store):
    banks = [BankStore(store), BankStore(store)]  # two "processes"
    errors = []

    def writer(w: int) -> None:
        try:
            for i in range(10):
                def add(bank, i=i):
                    time.sleep(0.002)  # widen the read-modify-write window
                    bank.add("cat", f"w{w}-{i}", vec(100 * w + i), group=f"w{w}")
                banks[w].update(9, add)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    final = BankStore(store).get(9)
    assert len(final) == 20
    assert BankStore(store).version(9) == final.version


def test_replace_swaps_whole_bank_even_with_another_dimension(store):
    banks = BankStore(store)
    banks.update(2, lambda b: b.add("cat", "old", vec(1, dim=8)))
    fresh = MemoryBank()
    fresh.add("dog", "new", vec(2, dim=16), group="a9")
    v = banks.replace(2, lambda old: fresh)
    got = banks.get(2)
    assert v == fresh.version == banks.version(2)
    assert got.classes == ["dog"] and got.dim == 16 and "old" not in got


def test_get_caches_by_version(store):
    banks = BankStore(store)
    banks.update(1, lambda b: b.add("cat", "r1", vec(1)))
    first = banks.get(1)
    assert banks.get(1) is first  # unchanged version: no deserialisation
    BankStore(store).update(1, lambda b: b.add("cat", "r2", vec(2)))  # another process writes
    second = banks.get(1)
    assert second is not first and len(second) == 2


def test_project_settings(store):
    banks = BankStore(store)
    banks.set_label_config(4, "<View/>")
    banks.set_ls_connection(4, "http://ls:8080", "tok123")
    assert banks.label_config(4) == "<View/>"
    assert banks.ls_connection(4) == ("http://ls:8080", "tok123")
    assert banks.label_config(5) is None


def test_sqlite_store_bank_survives_restart(tmp_path):
    store = SQLiteStore(tmp_path / "store.sqlite3")
    v = BankStore(store).update(7, lambda b: b.add("cat", "r1", vec(1)))
    BankStore(store).set_label_config(7, "<View/>")
    store.close()
    again = BankStore(SQLiteStore(tmp_path / "store.sqlite3"))
    assert again.version(7) == v
    assert again.get(7).version == v
    assert again.label_config(7) == "<View/>"


def test_basis_is_written_with_the_bank(store):
    banks = BankStore(store)
    assert banks.basis(6) is None
    basis = {"engine": "sam2-t+dinov2-s", "config": "abc"}
    v = banks.update(6, lambda b: b.add("cat", "r1", vec(1)), basis=basis)
    assert banks.basis(6) == basis and banks.version(6) == v
    # a basis change alone (same references) is stored too, and the version stays
    assert banks.update(6, lambda b: None, basis={**basis, "config": "def"}) == v
    assert banks.basis(6)["config"] == "def"

    def broken(bank):
        bank.add("dog", "r2", vec(2))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        banks.update(6, broken, basis={**basis, "config": "ghi"})
    assert banks.basis(6)["config"] == "def" and banks.version(6) == v
