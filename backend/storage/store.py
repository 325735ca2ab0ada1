"""A tiny key-value store shared by the web process and the workers.

`RedisStore` is the production store (web and workers on different machines share it).
`MemoryStore` is the embedded no-Redis mode (one process, in-process worker thread); it writes the
keys under chosen prefixes (banks, task registry) to a folder so a restart keeps them.

Keys, hash fields and set members are strings; values are bytes (str is accepted on write and
stored as UTF-8). Every key gets the store's prefix, so tests and deployments can share a Redis.
"""
from __future__ import annotations

import base64
import json
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import redis

from model.atomic import atomic_write

Value = bytes | str


def _b(value: Value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class LockTimeout(RuntimeError):
    """A store lock could not be acquired in time."""


DELIVERY_TTL_S = 24 * 3600  # late-delivery claims outlive any queued predict job


class Store(ABC):
    """The operations the backend needs; see the module docstring for the value conventions."""

    @abstractmethod
    def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    def set(self, key: str, value: Value, ttl: float | None = None) -> None: ...

    @abstractmethod
    def set_many(self, mapping: dict[str, Value]) -> None:
        """Write several keys in one transaction: all or none are visible."""

    @abstractmethod
    def delete(self, *keys: str) -> int: ...

    @abstractmethod
    def setnx(self, key: str, value: Value, ttl: float | None = None) -> bool:
        """Set only if absent; True when this call set it."""

    @abstractmethod
    def hget(self, name: str, field: str) -> bytes | None: ...

    @abstractmethod
    def hset(self, name: str, mapping: dict[str, Value]) -> None: ...

    @abstractmethod
    def hgetall(self, name: str) -> dict[str, bytes]: ...

    @abstractmethod
    def hdel(self, name: str, *fields: str) -> int: ...

    @abstractmethod
    def sadd(self, name: str, *members: str) -> int: ...

    @abstractmethod
    def srem(self, name: str, *members: str) -> int: ...

    @abstractmethod
    def smembers(self, name: str) -> set[str]: ...

    @abstractmethod
    def incr(self, key: str) -> int: ...

    @abstractmethod
    def lock(self, name: str, timeout: float = 60.0, blocking_timeout: float | None = 120.0):
        """Context manager holding a named lock; it expires after `timeout` s if the holder dies.
        Raises LockTimeout when not acquired within `blocking_timeout` s (None = wait forever)."""

    @abstractmethod
    def ping(self) -> bool:
        """True when the store answers (never raises)."""

    def claim(self, key: str, who: str, ttl: float = DELIVERY_TTL_S) -> str:
        """First caller wins: set key to `who` if absent and return whoever holds it now.

        Used for late delivery of /predict results: the web process and the job both claim the
        same key, and exactly one of them delivers the prediction.
        """
        while True:
            if self.setnx(key, who, ttl):
                return who
            holder = self.get(key)
            if holder is not None:  # else it expired between the two calls: try again
                return holder.decode()


# ---------------------------------------------------------------------------------------- Redis
class RedisStore(Store):
    """redis-py backed store; `prefix` namespaces every key (and lock)."""

    def __init__(self, url: str, prefix: str = "ntt:") -> None:
        self.prefix = prefix
        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=1,
                                          health_check_interval=30)

    def _k(self, key: str) -> str:
        return self.prefix + key

    def get(self, key: str) -> bytes | None:
        return self.redis.get(self._k(key))

    def set(self, key: str, value: Value, ttl: float | None = None) -> None:
        self.redis.set(self._k(key), _b(value), px=None if ttl is None else int(ttl * 1000))

    def set_many(self, mapping: dict[str, Value]) -> None:
        with self.redis.pipeline(transaction=True) as pipe:  # MULTI ... EXEC
            for key, value in mapping.items():
                pipe.set(self._k(key), _b(value))
            pipe.execute()

    def delete(self, *keys: str) -> int:
        return int(self.redis.delete(*map(self._k, keys))) if keys else 0

    def setnx(self, key: str, value: Value, ttl: float | None = None) -> bool:
        return bool(self.redis.set(self._k(key), _b(value), nx=True,
                                   px=None if ttl is None else int(ttl * 1000)))

    def hget(self, name: str, field: str) -> bytes | None:
        return self.redis.hget(self._k(name), field)

    def hset(self, name: str, mapping: dict[str, Value]) -> None:
        if mapping:
            self.redis.hset(self._k(name), mapping={f: _b(v) for f, v in mapping.items()})

    def hgetall(self, name: str) -> dict[str, bytes]:
        return {f.decode(): v for f, v in self.redis.hgetall(self._k(name)).items()}

    def hdel(self, name: str, *fields: str) -> int:
        return int(self.redis.hdel(self._k(name), *fields)) if fields else 0

    def sadd(self, name: str, *members: str) -> int:
        return int(self.redis.sadd(self._k(name), *members)) if members else 0

    def srem(self, name: str, *members: str) -> int:
        return int(self.redis.srem(self._k(name), *members)) if members else 0

    def smembers(self, name: str) -> set[str]:
        return {m.decode() for m in self.redis.smembers(self._k(name))}

    def incr(self, key: str) -> int:
        return int(self.redis.incr(self._k(key)))

    @contextmanager
    def lock(self, name: str, timeout: float = 60.0, blocking_timeout: float | None = 120.0):
        lk = self.redis.lock(self._k("lock:" + name), timeout=timeout, blocking_timeout=blocking_timeout)
        if not lk.acquire():
            raise LockTimeout(f"lock {name!r} not acquired within {blocking_timeout} s")
        try:
            yield
        finally:
            try:
                lk.release()
            except redis.exceptions.LockError:  # expired while held: someone else may own it now
                pass

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.exceptions.RedisError:
            return False


# ---------------------------------------------------------------------------------------- memory
class MemoryStore(Store):
    """Dict + lock store for the embedded mode.

    Keys starting with one of `persist_prefixes` are also written to `persist_dir`, one file per
    group (the first two ':'-separated parts of the key, e.g. "bank:7"), atomically (temp file +
    os.replace), so a multi-key `set_many` within one group survives a crash all or nothing.
    TTLs run on `clock` (seconds; tests pass a fake one to expire keys without sleeping).
    """

    def __init__(self, persist_dir: str | os.PathLike | None = None,
                 persist_prefixes: tuple[str, ...] = (), clock: Callable[[], float] = time.monotonic) -> None:
        self._data: dict[str, object] = {}        # bytes | dict[str, bytes] | set[str]
        self._expiry: dict[str, float] = {}
        self._clock = clock
        self._mutex = threading.RLock()
        self._locks: dict[str, threading.Lock] = {}
        self._dir = Path(persist_dir) if persist_dir else None
        self._prefixes = tuple(persist_prefixes) if self._dir else ()
        if self._dir:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._load()

    # ---- persistence
    @staticmethod
    def _group(key: str) -> str:
        return ":".join(key.split(":")[:2])

    def _persisted(self, key: str) -> bool:
        return key.startswith(self._prefixes) if self._prefixes else False

    def _file(self, group: str) -> Path:
        return self._dir / (quote(group, safe="") + ".json")

    def _flush(self, keys) -> None:
        for group in {self._group(k) for k in keys if self._persisted(k)}:
            doc = {}
            for key, val in self._data.items():
                if self._group(key) != group or not self._persisted(key):
                    continue
                if isinstance(val, bytes):
                    doc[key] = {"t": "s", "v": base64.b64encode(val).decode()}
                elif isinstance(val, dict):
                    doc[key] = {"t": "h", "v": {f: base64.b64encode(v).decode() for f, v in val.items()}}
                else:
                    doc[key] = {"t": "z", "v": sorted(val)}
            path = self._file(group)
            if not doc:
                path.unlink(missing_ok=True)
                continue
            atomic_write(path, json.dumps(doc))

    def _load(self) -> None:
        for path in self._dir.glob("*.json"):
            for key, item in json.loads(path.read_text()).items():
                if item["t"] == "s":
                    self._data[key] = base64.b64decode(item["v"])
                elif item["t"] == "h":
                    self._data[key] = {f: base64.b64decode(v) for f, v in item["v"].items()}
                else:
                    self._data[key] = set(item["v"])

    # ---- helpers
    def _live(self, key: str):
        exp = self._expiry.get(key)
        if exp is not None and exp <= self._clock():
            self._data.pop(key, None)
            self._expiry.pop(key, None)
        return self._data.get(key)

    def _typed(self, key: str, kind: type, create: bool = False):
        val = self._live(key)
        if val is None:
            if not create:
                return None
            val = self._data[key] = kind()
        if not isinstance(val, kind):
            raise TypeError(f"key {key!r} holds a {type(val).__name__}, not a {kind.__name__}")
        return val

    def _put(self, key: str, value: Value, ttl: float | None) -> None:
        self._data[key] = _b(value)
        if ttl is None:
            self._expiry.pop(key, None)
        else:
            self._expiry[key] = self._clock() + ttl

    # ---- API
    def get(self, key: str) -> bytes | None:
        with self._mutex:
            return self._typed(key, bytes)

    def set(self, key: str, value: Value, ttl: float | None = None) -> None:
        with self._mutex:
            self._put(key, value, ttl)
            self._flush([key])

    def set_many(self, mapping: dict[str, Value]) -> None:
        with self._mutex:
            for key, value in mapping.items():
                self._put(key, value, None)
            self._flush(mapping)

    def delete(self, *keys: str) -> int:
        with self._mutex:
            n = sum(self._live(k) is not None for k in keys)
            for k in keys:
                self._data.pop(k, None)
                self._expiry.pop(k, None)
            self._flush(keys)
            return n

    def setnx(self, key: str, value: Value, ttl: float | None = None) -> bool:
        with self._mutex:
            if self._live(key) is not None:
                return False
            self._put(key, value, ttl)
            self._flush([key])
            return True

    def hget(self, name: str, field: str) -> bytes | None:
        with self._mutex:
            return (self._typed(name, dict) or {}).get(field)

    def hset(self, name: str, mapping: dict[str, Value]) -> None:
        if not mapping:
            return
        with self._mutex:
            self._typed(name, dict, create=True).update({f: _b(v) for f, v in mapping.items()})
            self._flush([name])

    def hgetall(self, name: str) -> dict[str, bytes]:
        with self._mutex:
            return dict(self._typed(name, dict) or {})

    def hdel(self, name: str, *fields: str) -> int:
        with self._mutex:
            h = self._typed(name, dict)
            if not h:
                return 0
            n = sum(h.pop(f, None) is not None for f in fields)
            if not h:
                del self._data[name]
            self._flush([name])
            return n

    def sadd(self, name: str, *members: str) -> int:
        with self._mutex:
            s = self._typed(name, set, create=True)
            before = len(s)
            s.update(members)
            self._flush([name])
            return len(s) - before

    def srem(self, name: str, *members: str) -> int:
        with self._mutex:
            s = self._typed(name, set)
            if not s:
                return 0
            before = len(s)
            s.difference_update(members)
            if not s:
                del self._data[name]
            self._flush([name])
            return before - len(s)

    def smembers(self, name: str) -> set[str]:
        with self._mutex:
            return set(self._typed(name, set) or ())

    def incr(self, key: str) -> int:
        with self._mutex:
            value = int(self._typed(key, bytes) or b"0") + 1
            self._data[key] = str(value).encode()
            self._flush([key])
            return value

    @contextmanager
    def lock(self, name: str, timeout: float = 60.0, blocking_timeout: float | None = 120.0) -> Iterator[None]:
        # `timeout` (expiry when the holder dies) has no meaning in one process: a dead thread
        # cannot hold a lock here. Locks are never dropped from the dict (names are few).
        with self._mutex:
            lk = self._locks.setdefault(name, threading.Lock())
        if not lk.acquire(timeout=-1 if blocking_timeout is None else blocking_timeout):
            raise LockTimeout(f"lock {name!r} not acquired within {blocking_timeout} s")
        try:
            yield
        finally:
            lk.release()

    def ping(self) -> bool:
        return True
