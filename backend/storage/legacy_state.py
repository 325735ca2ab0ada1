"""One-time import of the embedded mode's state as the store before SQLiteStore kept it.

That store wrote the keys of banks, task registries and the engine to MODEL_DIR/state, one JSON
file per key group: {key: {"t": "s" | "h" | "z", "v": base64 string | {field: base64} | [members]}}.
On the first start with SQLiteStore the files are imported (idempotent writes, so an import cut
short is simply done again) and then moved to state/imported-json/, kept for a manual rollback.
"""
from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

from backend.storage.store import Store

log = logging.getLogger(__name__)

IMPORTED = "imported-json"


def _import_file(store: Store, path: Path) -> int:
    """Write the keys of one state file into `store`; the number of keys."""
    doc = json.loads(path.read_text())
    for key, item in doc.items():
        kind, value = item["t"], item["v"]
        if kind == "s":
            store.set(key, base64.b64decode(value))
        elif kind == "h":
            store.hset(key, {field: base64.b64decode(v) for field, v in value.items()})
        elif kind == "z":
            store.sadd(key, *value)
        else:
            raise ValueError(f"key {key!r} has unknown type {kind!r}")
    return len(doc)


def import_json_state(store: Store, folder: Path) -> int:
    """Import and set aside the old store's files in `folder` (none: nothing happens); returns the
    number of keys imported. A file that cannot be read stays where it is, with an error logged."""
    keys = 0
    for path in sorted(Path(folder).glob("*.json")):
        try:
            keys += _import_file(store, path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.error("state file %s not imported (%s: %s); it is left in place", path, type(e).__name__, e)
            continue
        (path.parent / IMPORTED).mkdir(exist_ok=True)
        path.replace(path.parent / IMPORTED / path.name)
        log.warning("imported %s into the SQLite store; the file is kept in %s", path.name, IMPORTED)
    return keys
