"""Per-project memory banks in the shared Store, changed only by atomic read-modify-write.

Keys (all under "bank:<pid>:", all of them in one transaction where written together):
  data          MemoryBank.to_bytes()
  version       the bank's content hash ("empty" without references), readable without
                deserialising (model_version, /setup)
  basis         JSON {"engine", "weights", "config"} the references were computed with (engine
                name, weights fingerprint, hash of the label config); written with the bank, so a
                change of any is noticed
  label_config  the project's current label config XML (from /setup and webhooks)
  ls            JSON {"hostname", "access_token"} from /setup (never logged)
  tuning        JSON {"variant", "thresholds"} the last evaluation chose (Tuning; part of model_version)
  evaluation    JSON of the last evaluation (backend.jobs.evaluation), with "thumbnails" beside it
and "bank:projects", the set of project ids that ever got a label config (GET /versions).

`update` holds a per-project store lock, applies the caller's edit to a freshly loaded bank and
writes bytes + version in one transaction; an exception before that write (or a killed worker)
leaves the previous bank and version untouched.

The web process only reads versions and writes settings, so model.bank (and torch) is imported
only where a bank is (de)serialised.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from backend.storage.store import Store

if TYPE_CHECKING:
    from model.bank import MemoryBank

log = logging.getLogger(__name__)

EMPTY_VERSION = "empty"  # version of a project without references (readable in model_version)
FAITHFUL_VARIANT = "ntt"


@dataclass(frozen=True)
class Tuning:
    """What an evaluation sets beside the bank: the matching variant in use and the calibrated
    per-class thresholds (label -> score). Predictions depend on it, so it is part of model_version."""

    variant: str = FAITHFUL_VARIANT
    thresholds: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"variant": self.variant, "thresholds": dict(sorted(self.thresholds.items()))}

    @property
    def version(self) -> str:
        """'' for the method as configured (no calibrated threshold, faithful variant), so such
        projects keep their model_version; else a short hash of the tuning."""
        if self.variant == FAITHFUL_VARIANT and not self.thresholds:
            return ""
        return "t" + hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]


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

    # ------------------------------------------------------------------ tuning (evaluation)
    def tuning(self, pid: int) -> Tuning:
        """The tuning the last evaluation stored (the faithful method and no thresholds before any)."""
        raw = self.store.get(self._key(pid, "tuning"))
        if not raw:
            return Tuning()
        doc = json.loads(raw)
        return Tuning(str(doc.get("variant") or FAITHFUL_VARIANT),
                      {str(k): float(v) for k, v in (doc.get("thresholds") or {}).items()})

    def set_tuning(self, pid: int, tuning: Tuning) -> bool:
        """Store the tuning; True when it changed (predictions must then be refreshed)."""
        if tuning.to_dict() == self.tuning(pid).to_dict():
            return False
        self.store.set(self._key(pid, "tuning"), json.dumps(tuning.to_dict(), sort_keys=True))
        log.info("project %s: tuning -> variant %s, %d calibrated thresholds", pid, tuning.variant,
                 len(tuning.thresholds))
        return True

    def evaluation(self, pid: int) -> dict | None:
        """The last evaluation's result (JSON), None before any."""
        raw = self.store.get(self._key(pid, "evaluation"))
        return json.loads(raw) if raw else None

    def thumbnails(self, pid: int) -> dict[str, str]:
        """{task id: base64 JPEG} of the last evaluation's gallery."""
        raw = self.store.get(self._key(pid, "thumbnails"))
        return json.loads(raw) if raw else {}

    def set_evaluation(self, pid: int, result: dict, thumbnails: dict[str, str]) -> None:
        """Store an evaluation's result with its gallery's thumbnails, together."""
        self.store.set_many({self._key(pid, "evaluation"): json.dumps(result),
                             self._key(pid, "thumbnails"): json.dumps(thumbnails)})

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

