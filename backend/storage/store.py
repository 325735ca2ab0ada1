"""A tiny key-value store shared by the web process and the workers.

`RedisStore` is the production store (web and workers on different machines share it).
`backend.storage.sqlite_store.SQLiteStore` is the embedded no-Redis mode's (one process, in-process
worker thread): a SQLite file under MODEL_DIR/state, so a restart keeps every key.

Keys, hash fields and set members are strings; values are bytes (str is accepted on write and
stored as UTF-8). RedisStore prefixes every key, so tests and deployments can share a Redis.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager

import redis

Value = bytes | str


def as_bytes(value: Value) -> bytes:
    """The stored form of a value (str as UTF-8)."""
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
    def hmget(self, name: str, fields: list[str]) -> list[bytes | None]:
        """The values of `fields` (None where absent), in their order: one round trip."""

    @abstractmethod
    def hset(self, name: str, mapping: dict[str, Value]) -> None: ...

    @abstractmethod
    def hgetall(self, name: str) -> dict[str, bytes]: ...

    @abstractmethod
    def hdel(self, name: str, *fields: str) -> int: ...

    @abstractmethod
    def sadd(self, name: str, *members: str) -> int: ...

    @abstractmethod
    def smembers(self, name: str) -> set[str]: ...

    @abstractmethod
    def lock(self, name: str, timeout: float = 60.0, blocking_timeout: float | None = 120.0):
        """Context manager holding a named lock; it expires after `timeout` s if the holder dies.
        Raises LockTimeout when not acquired within `blocking_timeout` s (None = wait forever)."""

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
        self.redis.set(self._k(key), as_bytes(value), px=None if ttl is None else int(ttl * 1000))

    def set_many(self, mapping: dict[str, Value]) -> None:
        with self.redis.pipeline(transaction=True) as pipe:  # MULTI ... EXEC
            for key, value in mapping.items():
                pipe.set(self._k(key), as_bytes(value))
            pipe.execute()

    def delete(self, *keys: str) -> int:
        return int(self.redis.delete(*map(self._k, keys))) if keys else 0

    def setnx(self, key: str, value: Value, ttl: float | None = None) -> bool:
        return bool(self.redis.set(self._k(key), as_bytes(value), nx=True,
                                   px=None if ttl is None else int(ttl * 1000)))

    def hget(self, name: str, field: str) -> bytes | None:
        return self.redis.hget(self._k(name), field)

    def hmget(self, name: str, fields: list[str]) -> list[bytes | None]:
        return list(self.redis.hmget(self._k(name), fields)) if fields else []

    def hset(self, name: str, mapping: dict[str, Value]) -> None:
        if mapping:
            self.redis.hset(self._k(name), mapping={f: as_bytes(v) for f, v in mapping.items()})

    def hgetall(self, name: str) -> dict[str, bytes]:
        return {f.decode(): v for f, v in self.redis.hgetall(self._k(name)).items()}

    def hdel(self, name: str, *fields: str) -> int:
        return int(self.redis.hdel(self._k(name), *fields)) if fields else 0

    def sadd(self, name: str, *members: str) -> int:
        return int(self.redis.sadd(self._k(name), *members)) if members else 0

    def smembers(self, name: str) -> set[str]:
        return {m.decode() for m in self.redis.smembers(self._k(name))}

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
