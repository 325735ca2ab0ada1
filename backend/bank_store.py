"""Per-project memory banks in the shared Store, changed only by atomic read-modify-write.

Keys (all under "bank:<pid>:", one persistence group in MemoryStore):
  data          MemoryBank.to_bytes()
  version       the bank's content hash ("empty" without references), readable without
                deserialising (model_version, /setup)
  basis         JSON {"engine", "weights", "config"} the references were computed with (engine
                name, weights fingerprint, hash of the label config); written with the bank, so a
                change of any is noticed
  label_config  the project's current label config XML (from /setup and webhooks)
  ls            JSON {"hostname", "access_token"} from /setup (never logged)
and "bank:projects", the set of project ids that ever got a label config (GET /versions).

`update` holds a per-project store lock, applies the caller's edit to a freshly loaded bank and
writes bytes + version in one transaction; an exception before that write (or a killed worker)
leaves the previous bank and version untouched.

The web process only reads versions and writes settings, so model.bank (and torch) is imported
only where a bank is (de)serialised.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from backend.store import Store

if TYPE_CHECKING:
    from model.bank import MemoryBank

log = logging.getLogger(__name__)

EMPTY_VERSION = "empty"  # version of a project without references (readable in model_version)


def bank_version(bank: "MemoryBank") -> str:
    """The stored version of a bank: its content hash, or EMPTY_VERSION when it holds nothing."""
    return bank.version if len(bank) else EMPTY_VERSION


class BankStore:
    """Banks of all projects; `get` keeps the last deserialised bank per project (by version)."""

    def __init__(self, store: Store, lock_timeout: float = 60.0) -> None:
        self.store = store
        self.lock_timeout = lock_timeout
        self._cache: dict[int, MemoryBank] = {}
        self._cache_lock = threading.Lock()

    @staticmethod
    def _key(pid: int, name: str) -> str:
        return f"bank:{int(pid)}:{name}"

    # ------------------------------------------------------------------ bank
    def version(self, pid: int) -> str:
        """Current bank version (cheap: one key read)."""
        raw = self.store.get(self._key(pid, "version"))
        return raw.decode() if raw else EMPTY_VERSION

    def _load(self, pid: int) -> "MemoryBank":
        from model.bank import MemoryBank  # torch: workers only

        data = self.store.get(self._key(pid, "data"))
        return MemoryBank.from_bytes(data) if data else MemoryBank()

    def get(self, pid: int) -> "MemoryBank":
        """The project's current bank. Shared between callers: treat it as read-only."""
        version = self.version(pid)
        with self._cache_lock:
            cached = self._cache.get(pid)
        if cached is not None and bank_version(cached) == version:
            return cached
        bank = self._load(pid)  # keyed by its own content hash, so a concurrent write cannot mislabel it
        with self._cache_lock:
            self._cache[pid] = bank
        return bank

    def basis(self, pid: int) -> dict | None:
        """{"engine", "weights", "config"} the stored references were computed with; None before any
        update."""
        raw = self.store.get(self._key(pid, "basis"))
        return json.loads(raw) if raw else None

    def update(self, pid: int, fn: Callable[["MemoryBank"], None], basis: dict | None = None) -> str:
        """Apply `fn` to the bank in place, atomically; returns the new (or unchanged) version."""
        def edit(bank: "MemoryBank") -> "MemoryBank":
            fn(bank)
            return bank
        return self.replace(pid, edit, basis)

    def replace(self, pid: int, build: Callable[["MemoryBank"], "MemoryBank"], basis: dict | None = None) -> str:
        """Store the bank `build(current bank)` returns, atomically; returns the new version.

        `build` may edit and return the bank it gets, or return a new one (a rebuild). `basis`,
        when given, is written in the same transaction.
        """
        # the lock expires lock_timeout s after a holder died; waiters outlast that
        with self.store.lock(f"bank:{int(pid)}", timeout=self.lock_timeout,
                             blocking_timeout=2.5 * self.lock_timeout):
            current = self._load(pid)
            before = bank_version(current)
            bank = build(current)
            version = bank_version(bank)
            writes: dict[str, bytes | str] = {}
            if version != before:
                writes = {self._key(pid, "data"): bank.to_bytes(), self._key(pid, "version"): version}
            if basis is not None and basis != self.basis(pid):
                writes[self._key(pid, "basis")] = json.dumps(basis, sort_keys=True)
            if writes:
                self.store.set_many(writes)  # MULTI/EXEC: bank, version and basis together
            if version == before:
                return before
        log.info("project %s: bank %s -> %s (%d references)", pid, before, version, len(bank))
        return version

    # ------------------------------------------------------------------ project settings
    def set_label_config(self, pid: int, xml: str) -> None:
        self.store.set(self._key(pid, "label_config"), xml)
        self.store.sadd("bank:projects", str(int(pid)))

    def projects(self) -> list[int]:
        """Ids of the projects that ever got a label config, in order."""
        return sorted(int(p) for p in self.store.smembers("bank:projects"))

    def label_config(self, pid: int) -> str | None:
        raw = self.store.get(self._key(pid, "label_config"))
        return raw.decode() if raw is not None else None

    def set_ls_connection(self, pid: int, hostname: str | None, access_token: str | None) -> None:
        """Remember the Label Studio URL and token /setup sent for this project."""
        self.store.set(self._key(pid, "ls"), json.dumps({"hostname": hostname, "access_token": access_token}))

    def ls_connection(self, pid: int) -> tuple[str | None, str | None]:
        """(hostname, access_token) from the last /setup, (None, None) if never set up."""
        raw = self.store.get(self._key(pid, "ls"))
        if not raw:
            return None, None
        doc = json.loads(raw)
        return doc.get("hostname"), doc.get("access_token")

