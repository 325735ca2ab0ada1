"""Label configs by content hash.

A queued job carries a config's hash, not its XML (kilobytes per task otherwise): the web
process stores the XML once under its hash and the job reads it back.
"""
from __future__ import annotations

import hashlib

from backend.errors import BadRequest
from backend.storage.store import Store

CONFIG_TTL_S = 30 * 24 * 3600  # outlives any queued job; every put renews it


def config_hash(xml: str) -> str:
    """16 hex characters of the XML's sha256 (also the "config" of a bank's basis)."""
    return hashlib.sha256(xml.encode()).hexdigest()[:16]


def put(store: Store, xml: str) -> str:
    """Store the XML under its hash; returns the hash."""
    digest = config_hash(xml)
    store.set(f"config:{digest}", xml, ttl=CONFIG_TTL_S)
    return digest


def get(store: Store, digest: str) -> str:
    """The XML of a hash `put` stored; BadRequest when it is unknown (expired, or never stored)."""
    raw = store.get(f"config:{digest}")
    if raw is None:
        raise BadRequest(f"label config {digest} is not stored (expired?); Label Studio will ask again")
    return raw.decode()
