"""Per-process singletons: settings, store, banks, registry, caches, the engine, LS connections.

A worker builds the engine once (first `get_engine()`) and keeps it for every job. The web process
only touches the cheap ones (settings, store, banks, model_version): nothing here imports torch
until `get_engine()` or `get_proposal_cache()` is called. Each singleton has its own lock, so a
slow build (loading models) never blocks `/setup` reading a version.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from backend.storage.bank_store import BankStore, Tuning
from backend.errors import LabelStudioAPIError
from backend.settings import Settings
from backend.storage.legacy_state import import_json_state
from backend.storage.sqlite_store import SQLiteStore
from backend.storage.store import RedisStore, Store
from backend.storage.tasks_registry import TaskRegistry
from model import catalog

if TYPE_CHECKING:
    from backend.ls.images import ImageFetcher
    from backend.ls.auth import LSAuth
    from backend.ls.ls_client import LabelStudioClient
    from backend.storage.proposal_cache import ProposalCache
    from model.engine import Engine

T = TypeVar("T")

# Store key of the engine the workers loaded: JSON {"engine": name, "weights": fingerprint}.
ENGINE_KEY = "engine"
WEIGHTS_IN_VERSION = 8  # hex characters of the weights fingerprint in model_version

_objects: dict[Any, Any] = {}
_locks: dict[Any, threading.Lock] = {}
_guard = threading.Lock()


def _single(name: Any, build: Callable[[], T]) -> T:
    """The process-wide object `name`, built on first use (once, even under concurrent calls)."""
    try:
        return _objects[name]
    except KeyError:
        pass
    with _guard:
        lock = _locks.setdefault(name, threading.Lock())
    with lock:
        if name not in _objects:
            _objects[name] = build()
        return _objects[name]


def configure(**objects: Any) -> None:
    """Install ready-made singletons (tests, benchmarks): settings=, store=, engine=, ..."""
    with _guard:
        _objects.update(objects)


def reset() -> None:
    """Forget every singleton (tests; after the environment changed)."""
    with _guard:
        _objects.clear()


# ---------------------------------------------------------------------------------------- cheap
def get_settings() -> Settings:
    return _single("settings", Settings.from_env)


def get_store() -> Store:
    """Redis (shared with the workers) when REDIS_URL is set, else the embedded SQLiteStore in
    MODEL_DIR/state/store.sqlite3 (which imports the state files of the store before it, once)."""
    def build() -> Store:
        s = get_settings()
        if s.redis_url:
            return RedisStore(s.redis_url, prefix=f"{s.queue_prefix}:")
        store = SQLiteStore(s.model_dir / "state" / "store.sqlite3")
        import_json_state(store, s.model_dir / "state")
        return store
    return _single("store", build)


def get_bank_store() -> BankStore:
    return _single("bank_store", lambda: BankStore(get_store()))


def get_registry() -> TaskRegistry:
    return _single("registry", lambda: TaskRegistry(get_store()))


def engine_name() -> str:
    """Model part of model_version, from the settings (no model is loaded); equals Engine.name."""
    s = get_settings()
    return catalog.engine_name(s.sam_model, s.dino_model)


def weights_fingerprint() -> str | None:
    """Fingerprint of the weights the jobs run with (Engine.fingerprint): this process's engine
    when it loaded one, else the one the workers published when they loaded theirs (the web
    process never loads models); None before any engine of these models was loaded."""
    engine = _objects.get("engine")
    if engine is not None:
        return engine.fingerprint
    raw = get_store().get(ENGINE_KEY)
    published = json.loads(raw) if raw else {}
    return published.get("weights") if published.get("engine") == engine_name() else None


def get_tuning(pid: int) -> Tuning:
    """The project's tuning in force: the variant and thresholds its last evaluation stored, the
    variant pinned by NTT_VARIANT unless it is "auto"."""
    stored = get_bank_store().tuning(pid)
    pinned = get_settings().variant
    return stored if pinned == "auto" else Tuning(pinned, stored.thresholds)


def model_version(pid: int, bank_version: str | None = None, tuning: Tuning | None = None) -> str:
    """'ntt-<sam>+<dino>@<weights>-<bank version>[-t<tuning hash>]'; changes whenever the project's
    bank, its tuning (calibrated thresholds, variant: backend.storage.bank_store.Tuning) or the workers'
    weights change (without a published fingerprint: 'ntt-<sam>+<dino>-<bank version>...').

    Pass `bank_version` and `tuning` when the caller already holds those it predicts with, so the
    version stamped on a prediction is the one actually used.
    """
    version = bank_version if bank_version is not None else get_bank_store().version(pid)
    tuned = (tuning if tuning is not None else get_tuning(pid)).version
    weights = weights_fingerprint()
    return (f"ntt-{engine_name()}{f'@{weights[:WEIGHTS_IN_VERSION]}' if weights else ''}-{version}"
            f"{f'-{tuned}' if tuned else ''}")


# ---------------------------------------------------------------------------------------- workers
def get_engine() -> "Engine":
    """SAM2 + DINOv2 from the settings, loaded once per process; their identity (names and weights
    fingerprint) is published in the store for the web process."""
    def build() -> "Engine":
        from model.engine import Engine, EngineConfig

        s = get_settings()
        random = s.random_weights
        engine = Engine(EngineConfig(
            sam_model=s.sam_model, dino_model=s.dino_model,
            sam_checkpoint=None if random else str(s.sam_checkpoint),
            dino_checkpoint=None if random else str(s.dino_checkpoint),
            random_weights=random, device=s.device, options=s.method_options()))
        # for the web process's model_version: a checkpoint swap makes LS predict again
        get_store().set(ENGINE_KEY, json.dumps({"engine": engine.name, "weights": engine.fingerprint}))
        return engine
    return _single("engine", build)


def get_proposal_cache() -> "ProposalCache":
    def build() -> "ProposalCache":
        from backend.storage.proposal_cache import ProposalCache

        s = get_settings()
        return ProposalCache(s.cache_dir / "proposals", s.proposal_cache_mb * 2**20)
    return _single("proposal_cache", build)


def _connection(pid: int) -> tuple[str | None, "LSAuth | None"]:
    """(LS URL, auth) for a project. A key only ever goes to the origin it came with:
    LABEL_STUDIO_API_KEY to LABEL_STUDIO_URL, the `access_token` of /setup to the `hostname` sent
    with it, so a /setup call can never make the backend send the operator's key to a host it names.
    LABEL_STUDIO_URL wins; without LABEL_STUDIO_API_KEY it uses /setup's token only when /setup's
    hostname is the same origin. One LSAuth per (URL, key), so a PAT's access token is shared."""
    from backend.ls.auth import LSAuth, origin

    s = get_settings()
    url, key = s.label_studio_url, s.label_studio_api_key
    if not (url and key):
        hostname, token = get_bank_store().ls_connection(pid)
        if not url:
            url, key = hostname, token
        elif origin(hostname) == origin(url):
            key = token
    if not key or not url:
        return url, None
    digest = hashlib.sha256(key.encode()).hexdigest()  # never keep the key itself in a dict key
    return url, _single(("auth", url, digest), lambda: LSAuth(key, url))


def get_ls_client(pid: int) -> "LabelStudioClient":
    """REST client for the project's Label Studio; LabelStudioAPIError when none is configured."""
    from backend.ls.ls_client import LabelStudioClient

    url, auth = _connection(pid)
    if not url or auth is None:
        raise LabelStudioAPIError(
            f"project {pid}: no Label Studio connection; set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY "
            "(or connect the project so that /setup sends its hostname and access token; that token "
            "is only sent to its own hostname, not to another LABEL_STUDIO_URL)")
    return _single(("client", url, id(auth)), lambda: LabelStudioClient(url, auth))


def get_fetcher(pid: int) -> "ImageFetcher":
    """Image loader for the project's Label Studio (auth headers go to its origin only)."""
    from backend.ls.images import ImageFetcher

    url, auth = _connection(pid)
    s = get_settings()
    return _single(("fetcher", url, id(auth)), lambda: ImageFetcher(
        url, auth, s.cache_dir / "images", s.image_cache_mb * 2**20,
        local_files_root=s.local_files_document_root, allowed_hosts=set(s.allowed_image_hosts),
        max_pixels=s.max_image_pixels, max_bytes=s.max_image_bytes,
        allow_link_local=s.allow_link_local_image_hosts))
