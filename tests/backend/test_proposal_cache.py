"""ProposalCache: exact round trip (same matching output), LRU eviction by bytes, corrupt entries."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.storage.proposal_cache import ProposalCache, cache_key
from model.bank import MemoryBank
from model.matching import match, match_full
from model.options import MethodOptions
from model.types import Proposals


def make_proposals(seed: int, n: int = 24, low: int = 16, size=(48, 64), dim: int = 32) -> Proposals:
    """Blob-like random logits (smooth noise) so that masks and their boundaries are realistic."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, low, low, generator=g)
    logits = F.avg_pool2d(noise, 5, stride=1, padding=2)[:, 0] * 6 - 0.3
    desc = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    iou = torch.rand(n, generator=g) * 0.5 + 0.5
    return Proposals(logits=logits, iou=iou, descriptors=desc, image_size=size, meta={"seed": seed})


def bank_for(props: Proposals) -> MemoryBank:
    bank = MemoryBank()
    for i, name in ((0, "cat"), (1, "cat"), (5, "dog"), (9, "bird")):
        bank.add(name, f"r{i}", props.descriptors[i].numpy() + 0.05)
    return bank


def _same(a, b) -> None:
    """Identical detections: labels, scores, boxes and full-size masks."""
    assert a.labels == b.labels
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    for i in range(len(a)):
        np.testing.assert_array_equal(a.mask(i), b.mask(i))


def key(i: int) -> str:
    return cache_key(f"{i:064x}", "sam2-t+dinov2-s", WEIGHTS, MethodOptions())


WEIGHTS = "0123456789abcdef"


def test_key_covers_image_engine_weights_and_options():
    sha = "ab" * 32
    k = cache_key(sha, "sam2-t+dinov2-s", WEIGHTS, MethodOptions())
    assert len(k) == 64 and k == cache_key(sha, "sam2-t+dinov2-s", WEIGHTS, MethodOptions())
    assert k != cache_key("cd" * 32, "sam2-t+dinov2-s", WEIGHTS, MethodOptions())
    assert k != cache_key(sha, "sam2-l+dinov2-s", WEIGHTS, MethodOptions())
    assert k != cache_key(sha, "sam2-t+dinov2-s", "fedcba9876543210", MethodOptions())  # a swapped checkpoint
    assert k != cache_key(sha, "sam2-t+dinov2-s", WEIGHTS, MethodOptions(points_per_side=16))
    # options that do not change proposals do not change the key
    assert k == cache_key(sha, "sam2-t+dinov2-s", WEIGHTS, MethodOptions(max_detections=5, score_threshold=0.3))
    # named deviations change proposals: in the key, except at their default (older caches stay valid)
    assert k != cache_key(sha, "sam2-t+dinov2-s", WEIGHTS, MethodOptions(point_batch_size=256))
    assert k != cache_key(sha, "sam2-t+dinov2-s", WEIGHTS, MethodOptions(drop_empty_masks=False))
    assert MethodOptions().cache_key() == "s1024-p32-i0.4-d518-gntt-a0-b0"


def test_put_get_gives_identical_matching(tmp_path):
    cache = ProposalCache(tmp_path, max_bytes=10**8)
    props = make_proposals(0)
    assert cache.get(key(0)) is None
    size = cache.put(key(0), props)
    assert 0 < size == cache.total_bytes()
    back = cache.get(key(0))
    assert back.image_size == (48, 64) and back.meta == {"seed": 0}
    torch.testing.assert_close(back.descriptors, props.descriptors, rtol=0, atol=0)
    torch.testing.assert_close(back.iou, props.iou, rtol=0, atol=0)
    bank = bank_for(props)
    fresh = match(props, bank, MethodOptions())
    cached = match(back, bank, MethodOptions())
    assert len(fresh) >= 3
    _same(fresh, cached)


def test_shared_folder_between_instances(tmp_path):
    ProposalCache(tmp_path, max_bytes=10**8).put(key(1), make_proposals(1))
    assert ProposalCache(tmp_path, max_bytes=10**8).get(key(1)) is not None


def test_eviction_keeps_total_under_max_and_drops_least_recently_used(tmp_path):
    one = len(make_proposals(0).to_bytes())
    cache = ProposalCache(tmp_path, max_bytes=int(3.5 * one), low_water=1.0)
    for i in range(3):
        cache.put(key(i), make_proposals(i))
        os.utime(cache._path(key(i)), (time.time() - 100 + i, time.time() - 100 + i))
    assert cache.get(key(0)) is not None  # hit: entry 0 becomes the most recent
    cache.put(key(3), make_proposals(3))  # over the limit: the LRU entry (1) goes
    cache.put(key(4), make_proposals(4))  # and then entry 2
    assert cache.total_bytes() <= int(3.5 * one)
    present = [i for i in range(5) if cache._path(key(i)).exists()]
    assert present == [0, 3, 4]


def test_eviction_follows_hits_in_a_row(tmp_path):
    """Uses in quick succession (within one tick of the kernel's coarse file-time clock) keep
    their order: after hits on entry 1 then entry 0, a new entry evicts 1."""
    one = len(make_proposals(0).to_bytes())
    for n in range(10):  # each round a fresh folder; an order left to chance fails within a few
        cache = ProposalCache(tmp_path / str(n), max_bytes=int(2.5 * one), low_water=1.0)
        cache.put(key(0), make_proposals(0))
        cache.put(key(1), make_proposals(1))
        assert cache.get(key(1)) is not None and cache.get(key(0)) is not None
        cache.put(key(2), make_proposals(2))
        assert [i for i in range(3) if cache.contains(key(i))] == [0, 2]


def test_eviction_sweeps_temp_files_of_killed_writers(tmp_path, monkeypatch):
    """A writer killed mid-put leaves atomic_write's temp file behind; eviction removes it once it
    is an hour old (a younger one may still be being written)."""
    import model.atomic as atomic

    one = len(make_proposals(0).to_bytes())
    cache = ProposalCache(tmp_path, max_bytes=int(1.5 * one), low_water=1.0)
    cache.put(key(0), make_proposals(0))
    folder = cache._path(key(0)).parent
    used = []

    def fail(src, dst):
        used.append(Path(src).name)
        raise OSError("killed")

    with monkeypatch.context() as m:  # learn the temp name atomic_write really uses
        m.setattr(atomic.os, "replace", fail)
        with pytest.raises(OSError):
            atomic.atomic_write(folder / (key(9) + ".ntp"), b"partial")
    old, young = folder / used[0], folder / f".{key(8)}.ntp.abcd.tmp"
    for path, age in ((old, 7200), (young, 10)):   # what a SIGKILL would have left
        path.write_bytes(b"partial")
        os.utime(path, (time.time() - age, time.time() - age))
    cache.put(key(1), make_proposals(1))  # over the limit: evicts, then sweeps
    assert not old.exists() and young.exists()


def test_corrupt_entry_is_a_miss_and_deleted(tmp_path):
    cache = ProposalCache(tmp_path, max_bytes=10**8)
    cache.put(key(0), make_proposals(0))
    path = cache._path(key(0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated write from a crashed process
    assert cache.get(key(0)) is None
    assert not path.exists()
    cache.put(key(0), make_proposals(0))
    assert cache.get(key(0)) is not None


def test_rejects_path_like_keys(tmp_path):
    cache = ProposalCache(tmp_path, max_bytes=10**8)
    with pytest.raises(ValueError):
        cache.get("../../etc/passwd")


def test_upsampled_masks_are_stored_beside_the_entry_and_reused(tmp_path):
    """The mask cache of a cached entry (the masks its matches upsampled) is stored next to it
    (put_masks), read back by any instance (get_masks), and saves the next match all upsampling
    with the same detections. New proposals under the key drop it; unreadable files or files
    written for other proposals are ignored."""
    cache = ProposalCache(tmp_path, max_bytes=10**8)
    props = make_proposals(0)
    cache.put(key(0), props)
    bank = bank_for(props)
    masks = cache.get_masks(key(0), props)
    assert len(masks) == 0 and masks.owner == props.checksum()
    first = match_full(props, bank, MethodOptions(), masks=masks)
    assert first.stats.upsampled > 0 and len(masks) == 0         # the match left the cache alone
    masks.update(first.upsampled)
    side = cache._path(key(0)).with_suffix(".ntm")
    written = cache.put_masks(key(0), masks)
    assert written == side.stat().st_size > 0
    assert cache.total_bytes() == written + cache._path(key(0)).stat().st_size

    other = ProposalCache(tmp_path, max_bytes=10**8)
    back = other.get(key(0))
    known = other.get_masks(key(0), back)
    assert known.keys() == masks.keys()
    again = match_full(back, bank, MethodOptions(), masks=known)
    assert again.stats.upsampled == 0 and len(again.upsampled) == 0
    _same(again.detections, first.detections)

    side.write_bytes(side.read_bytes()[:40])                  # torn: ignored and deleted
    old = cache.get(key(0))
    assert len(cache.get_masks(key(0), old)) == 0 and not side.exists()
    assert cache.put_masks(key(0), masks) > 0 and side.exists()
    cache.put(key(0), make_proposals(7))                      # other proposals, same key
    assert not side.exists()
    assert cache.put_masks(key(0), masks) > 0                 # written for the replaced entry...
    new = cache.get(key(0))
    assert len(cache.get_masks(key(0), new)) == 0             # ...so never used with the new one
    cache._path(key(1)).parent.mkdir(exist_ok=True)
    assert cache.put_masks(key(1), masks) == 0                # no entry: nothing stored