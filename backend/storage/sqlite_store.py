"""The embedded (no-Redis) Store: one SQLite file, every key durable, each write a few rows.

Why SQLite: a project's task registry is one hash of thousands of records, updated one record at a
time; rewriting a file per write costs O(N) per write (O(N^2) for a project). Here a record write
is one row upsert in a WAL journal (synchronous=NORMAL: a commit survives a crash of the process;
a power cut may lose the last few), so its cost does not grow with the project.

Sharing: the web threads and the embedded worker thread use one connection behind a mutex; other
processes (a second web process, tools) open the same file and SQLite's file locking, with a busy
timeout, orders their transactions. Keys are strings without a namespace per type (as in Redis,
callers keep string, hash and set names apart).

Time: string TTLs and lock expiries are wall-clock times (processes share them). An expired
string reads as absent and a setnx replaces it; expired rows are purged every PURGE_EVERY writes
and when a store opens. A lock is a row with an expiry and its holder's host and pid: it expires
`timeout` s after it was taken, as a Redis lock does, and a lock whose holder process on this host
is gone (killed) is taken over at once.
"""
from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from backend.storage.store import LockTimeout, Store, Value, as_bytes

BUSY_TIMEOUT_S = 30.0   # how long a transaction waits for another process's write lock
PURGE_EVERY = 1000      # writes between purges of expired strings and locks

_SCHEMA = """
CREATE TABLE IF NOT EXISTS strings (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires REAL);
CREATE TABLE IF NOT EXISTS hashes (name TEXT, field TEXT, value BLOB NOT NULL,
                                   PRIMARY KEY (name, field)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sets (name TEXT, member TEXT, PRIMARY KEY (name, member)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, token TEXT NOT NULL, host TEXT NOT NULL,
                                  pid INTEGER NOT NULL, expires REAL NOT NULL) WITHOUT ROWID;
"""
_LIVE = "(expires IS NULL OR expires > ?)"


def _process_alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (one we may not signal exists too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SQLiteStore(Store):
    """Store in the SQLite database `path` (created with its folder if missing); ":memory:" gives
    a private in-memory database (tests). TTLs run on `clock` (wall-clock seconds; tests pass a
    fake one to expire keys without sleeping)."""

    def __init__(self, path: str | os.PathLike = ":memory:", clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._mutex = threading.RLock()
        self._writes = 0
        self._host = socket.gethostname()
        # autocommit mode: every transaction is an explicit BEGIN IMMEDIATE ... COMMIT (_write)
        self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                     check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        self._purge()

    def close(self) -> None:
        with self._mutex:
            self._conn.close()

    # ---- transactions
    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the database's write lock up front (no deadlock between
        two processes that both read first and then want to write)."""
        with self._mutex:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                if self._conn.in_transaction:  # (some errors end the transaction themselves)
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            self._writes += 1
            if self._writes % PURGE_EVERY == 0:
                self._purge()

    def _read(self, sql: str, *args: object) -> list[tuple]:
        with self._mutex:
            return self._conn.execute(sql, args).fetchall()

    def _purge(self) -> None:
        now = self._clock()
        with self._mutex:
            self._conn.execute("DELETE FROM strings WHERE expires <= ?", (now,))
            self._conn.execute("DELETE FROM locks WHERE expires <= ?", (now,))

    # ---- strings
    def get(self, key: str) -> bytes | None:
        rows = self._read(f"SELECT value FROM strings WHERE key = ? AND {_LIVE}", key, self._clock())
        return bytes(rows[0][0]) if rows else None

    def set(self, key: str, value: Value, ttl: float | None = None) -> None:
        with self._write() as c:
            self._upsert(c, key, value, ttl)

    def _upsert(self, c: sqlite3.Connection, key: str, value: Value, ttl: float | None) -> None:
        c.execute("INSERT INTO strings (key, value, expires) VALUES (?, ?, ?) ON CONFLICT (key) "
                  "DO UPDATE SET value = excluded.value, expires = excluded.expires",
                  (key, as_bytes(value), None if ttl is None else self._clock() + ttl))

    def set_many(self, mapping: dict[str, Value]) -> None:
        with self._write() as c:
            for key, value in mapping.items():
                self._upsert(c, key, value, None)

    def setnx(self, key: str, value: Value, ttl: float | None = None) -> bool:
        now = self._clock()
        with self._write() as c:
            cur = c.execute("INSERT INTO strings (key, value, expires) VALUES (?, ?, ?) ON CONFLICT (key) "
                            "DO UPDATE SET value = excluded.value, expires = excluded.expires "
                            "WHERE strings.expires IS NOT NULL AND strings.expires <= ?",
                            (key, as_bytes(value), None if ttl is None else now + ttl, now))
            return cur.rowcount == 1

    def delete(self, *keys: str) -> int:
        now = self._clock()
        found = 0
        with self._write() as c:
            for key in set(keys):
                found += c.execute(
                    f"SELECT EXISTS (SELECT 1 FROM strings WHERE key = ? AND {_LIVE}) "
                    "OR EXISTS (SELECT 1 FROM hashes WHERE name = ?) OR EXISTS (SELECT 1 FROM sets WHERE name = ?)",
                    (key, now, key, key)).fetchone()[0]
                c.execute("DELETE FROM strings WHERE key = ?", (key,))
                c.execute("DELETE FROM hashes WHERE name = ?", (key,))
                c.execute("DELETE FROM sets WHERE name = ?", (key,))
        return found

    # ---- hashes
    def hget(self, name: str, field: str) -> bytes | None:
        rows = self._read("SELECT value FROM hashes WHERE name = ? AND field = ?", name, field)
        return bytes(rows[0][0]) if rows else None

    def hmget(self, name: str, fields: list[str]) -> list[bytes | None]:
        found: dict[str, bytes] = {}
        for start in range(0, len(fields), 500):  # under SQLite's bound on query parameters
            chunk = fields[start:start + 500]
            found.update((f, bytes(v)) for f, v in self._read(
                f"SELECT field, value FROM hashes WHERE name = ? AND field IN ({','.join('?' * len(chunk))})",
                name, *chunk))
        return [found.get(f) for f in fields]

    def hset(self, name: str, mapping: dict[str, Value]) -> None:
        if not mapping:
            return
        with self._write() as c:
            c.executemany("INSERT INTO hashes (name, field, value) VALUES (?, ?, ?) ON CONFLICT (name, field) "
                          "DO UPDATE SET value = excluded.value",
                          [(name, f, as_bytes(v)) for f, v in mapping.items()])

    def hgetall(self, name: str) -> dict[str, bytes]:
        return {f: bytes(v) for f, v in self._read("SELECT field, value FROM hashes WHERE name = ?", name)}

    def hdel(self, name: str, *fields: str) -> int:
        if not fields:
            return 0
        with self._write() as c:
            return sum(c.execute("DELETE FROM hashes WHERE name = ? AND field = ?", (name, f)).rowcount
                       for f in set(fields))

    # ---- sets
    def sadd(self, name: str, *members: str) -> int:
        if not members:
            return 0
        with self._write() as c:
            return sum(c.execute("INSERT OR IGNORE INTO sets (name, member) VALUES (?, ?)", (name, m)).rowcount
                       for m in set(members))

    def smembers(self, name: str) -> set[str]:
        return {m for (m,) in self._read("SELECT member FROM sets WHERE name = ?", name)}

    # ---- locks
    @contextmanager
    def lock(self, name: str, timeout: float = 60.0, blocking_timeout: float | None = 120.0) -> Iterator[None]:
        token = uuid.uuid4().hex
        deadline = None if blocking_timeout is None else time.monotonic() + blocking_timeout
        pause = 0.002
        while not self._try_lock(name, token, timeout):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise LockTimeout(f"lock {name!r} not acquired within {blocking_timeout} s")
            time.sleep(pause if left is None else min(pause, left))
            pause = min(pause * 2, 0.05)
        try:
            yield
        finally:
            with self._write() as c:
                c.execute("DELETE FROM locks WHERE name = ? AND token = ?", (name, token))

    def _try_lock(self, name: str, token: str, timeout: float) -> bool:
        now = self._clock()
        with self._write() as c:
            held = c.execute("SELECT host, pid, expires FROM locks WHERE name = ?", (name,)).fetchone()
            if held and held[2] > now and not (held[0] == self._host and not _process_alive(held[1])):
                return False
            c.execute("INSERT OR REPLACE INTO locks (name, token, host, pid, expires) VALUES (?, ?, ?, ?, ?)",
                      (name, token, self._host, os.getpid(), now + timeout))
            return True
