"""The Store contract, run against the real Redis on 127.0.0.1:6379 and the embedded SQLite store;
then what only the SQLite store promises: durability, cheap writes, locks across processes."""
from __future__ import annotations

import threading
import uuid

import pytest
import redis

from backend.storage.sqlite_store import SQLiteStore
from backend.storage.store import LockTimeout, RedisStore
from backend.storage.tasks_registry import TaskRecord, TaskRegistry
from tests.helpers import claim_race


@pytest.fixture
def redis_store():
    prefix = f"ntt-test-{uuid.uuid4().hex[:10]}:"
    store = RedisStore("redis://127.0.0.1:6379/0", prefix=prefix)
    yield store
    keys = list(store.redis.scan_iter(match=prefix + "*"))
    if keys:
        store.redis.delete(*keys)


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture(params=["redis", "sqlite"])
def store(request, tmp_path, clock):
    if request.param == "redis":
        return request.getfixturevalue("redis_store")
    return SQLiteStore(tmp_path / "state" / "store.sqlite3", clock=clock)


def pass_time(store, clock: FakeClock, seconds: float) -> None:
    """Let `seconds` go by for the store's TTLs, without sleeping: the SQLite store runs on the
    fake clock; on Redis, every key of the store has its remaining TTL shortened by `seconds`
    (a PEXPIRE to <= 0 deletes the key, as its expiry would)."""
    if isinstance(store, RedisStore):
        for key in store.redis.scan_iter(match=store.prefix + "*"):
            left = store.redis.pttl(key)
            if left >= 0:
                store.redis.pexpire(key, left - int(seconds * 1000))
    else:
        clock.now += seconds


def test_strings_and_ttl(store, clock):
    assert store.get("a") is None
    store.set("a", "x")
    assert store.get("a") == b"x"
    store.set("a", b"\x00\xff")
    assert store.get("a") == b"\x00\xff"
    store.set("t", "1", ttl=3600)
    pass_time(store, clock, 3500)  # (on Redis the last 100 s really pass: room for a busy machine)
    assert store.get("t") == b"1" and store.get("a") == b"\x00\xff"
    pass_time(store, clock, 200)
    assert store.get("t") is None and store.get("a") == b"\x00\xff"
    assert store.delete("a", "missing") == 1
    assert store.get("a") is None


def test_set_many(store):
    store.set_many({"k1": "1", "k2": b"2"})
    assert (store.get("k1"), store.get("k2")) == (b"1", b"2")
    store.set_many({"k1": "one"})
    assert (store.get("k1"), store.get("k2")) == (b"one", b"2")


def test_setnx_with_ttl(store, clock):
    assert store.setnx("once", "first", ttl=3600) is True
    pass_time(store, clock, 3500)
    assert store.setnx("once", "second") is False
    assert store.get("once") == b"first"
    pass_time(store, clock, 200)
    assert store.setnx("once", "third") is True
    assert store.get("once") == b"third"


def test_hashes(store):
    store.hset("h", {"a": "1", "b": b"2"})
    store.hset("h", {"b": "3"})
    assert store.hget("h", "b") == b"3"
    assert store.hget("h", "zz") is None
    assert store.hmget("h", ["b", "zz", "a"]) == [b"3", None, b"1"]
    assert store.hmget("nothing", ["a"]) == [None] and store.hmget("h", []) == []
    assert store.hgetall("h") == {"a": b"1", "b": b"3"}
    assert store.hdel("h", "a", "zz") == 1
    assert store.hgetall("h") == {"b": b"3"}
    assert store.hgetall("nothing") == {}


def test_registry_reads_and_merges_only_the_records_named(store):
    registry = TaskRegistry(store)
    registry.update(5, {t: {"image_url": f"/x/{t}.png"} for t in range(1, 1200)})  # > one SQL chunk
    merged = registry.update(5, {3: {"prediction_id": 9}, 2000: {"image_url": "/x/new.png"}})
    assert merged[3] == TaskRecord(3, "/x/3.png", prediction_id=9) and merged[2000].image_url == "/x/new.png"
    many = registry.get_many(5, [3, 7, 4000, *range(100, 1100)])
    assert many[3].prediction_id == 9 and many[7] == registry.get(5, 7) and 4000 not in many
    assert len(many) == 1002 and len(registry.all(5)) == 1200


def test_sets(store):
    assert store.sadd("s", "x", "y") == 2
    assert store.sadd("s", "y", "z") == 1
    assert store.smembers("s") == {"x", "y", "z"}
    assert store.smembers("none") == set()


def test_delete_any_type(store, clock):
    store.set("str", "v")
    store.hset("hash", {"f": "v"})
    store.sadd("set", "m")
    store.set("gone", "v", ttl=10)
    pass_time(store, clock, 20)
    assert store.delete("str", "hash", "set", "gone", "missing") == 3
    assert (store.get("str"), store.hgetall("hash"), store.smembers("set")) == (None, {}, set())


def test_claim_first_caller_wins(store):
    assert store.claim("deliver:1", "web", ttl=60) == "web"
    assert store.claim("deliver:1", "api", ttl=60) == "web"
    assert store.claim("deliver:2", "api", ttl=60) == "api"
    assert store.claim("deliver:2", "web", ttl=60) == "api"


def test_claim_race_has_one_winner(store):
    winners = claim_race([store])
    assert len(winners) == 8 and len(set(winners)) == 1


def test_lock_excludes_and_times_out(store):
    inside, held, release = [], threading.Event(), threading.Event()

    def hold():
        with store.lock("L", timeout=60):
            inside.append("held")
            held.set()
            assert release.wait(30)
            inside.append("releasing")

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(30)
    with pytest.raises(LockTimeout):  # the holder keeps it until `release`, however slow this is
        with store.lock("L", timeout=60, blocking_timeout=0.1):
            pass
    threading.Timer(0.2, release.set).start()  # most likely while the next line waits for the lock
    with store.lock("L", timeout=60, blocking_timeout=30):
        assert inside == ["held", "releasing"]  # got it only after the holder let go
    t.join()


def test_prefix_isolates_keys(redis_store):
    other = RedisStore("redis://127.0.0.1:6379/0", prefix=redis_store.prefix + "other:")
    redis_store.set("k", "mine")
    assert other.get("k") is None
    assert redis_store.redis.get(redis_store.prefix + "k") == b"mine"


def test_redis_down_raises():
    store = RedisStore("redis://127.0.0.1:1/0")  # nothing listens on port 1
    with pytest.raises(redis.exceptions.ConnectionError):
        store.get("k")


def test_redis_lock_of_a_dead_holder_expires(redis_store, clock):
    dead = redis_store.redis.lock(redis_store.prefix + "lock:L", timeout=60)
    assert dead.acquire(blocking=False)  # taken and never released: the worker was SIGKILLed
    with pytest.raises(LockTimeout):
        with redis_store.lock("L", blocking_timeout=0.05):
            pass
    pass_time(redis_store, clock, 60)  # the dead holder's lock expires
    with redis_store.lock("L", timeout=3600, blocking_timeout=30):
        assert redis_store.redis.ttl(redis_store.prefix + "lock:L") > 3000  # now held by us, with our expiry
