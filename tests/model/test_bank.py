"""MemoryBank: editing, prototype maths, content hash, persistence."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from model.bank import MemoryBank


def e(i: int, dim: int = 4, scale: float = 1.0) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[i] = scale
    return v


def small_bank() -> MemoryBank:
    bank = MemoryBank()
    bank.add("cat", "r1", e(0), group=10)
    bank.add("cat", "r2", e(1, scale=2.0), group=10)
    bank.add("dog", "r3", e(2, scale=3.0), group="11")
    return bank


def test_add_replace_remove_and_groups():
    bank = small_bank()
    assert len(bank) == 3 and bank.dim == 4 and bank.classes == ["cat", "dog"]
    assert [r.ref_id for r in bank.refs("cat")] == ["r1", "r2"]
    assert bank.refs("cat")[0].group == "10" and "r3" in bank and bank.refs("cow") == []
    bank.add("dog", "r2", e(3))                      # replace and move to another class
    assert len(bank) == 3 and [r.ref_id for r in bank.refs("dog")] == ["r2", "r3"]
    assert bank.refs("dog")[0].group is None
    assert bank.remove("r2") and not bank.remove("r2") and len(bank) == 2
    assert bank.remove_group("10") == 1 and bank.classes == ["dog"]   # int group stored as "10"
    assert bank.remove_group(11) == 1 and len(bank) == 0 and bank.classes == []
    assert bank.remove_group(11) == 0


def test_stored_descriptor_is_a_private_copy():
    bank, vec = MemoryBank(), e(0)
    bank.add("cat", "r1", vec)
    vec[0] = 5.0
    assert bank.refs("cat")[0].descriptor[0] == 1.0
    with pytest.raises(ValueError):
        bank.refs("cat")[0].descriptor[0] = 2.0


def test_rejects_bad_descriptors():
    bank = MemoryBank()
    bank.add("cat", "r1", e(0))
    for bad in (np.array([1.0, np.nan, 0, 0]), np.array([np.inf, 0, 0, 0]), np.ones(5), np.ones((2, 2))):
        with pytest.raises(ValueError):
            bank.add("cat", "r2", bad)
    with pytest.raises(ValueError):
        MemoryBank(dim=3).add("cat", "r1", e(0))
    with pytest.raises(ValueError):
        bank.add("", "r2", e(0))
    with pytest.raises(ValueError):
        bank.add("cat", "", e(0))
    assert len(bank) == 1 and bank.version == _single_ref_version()


def _single_ref_version() -> str:
    b = MemoryBank()
    b.add("cat", "r1", e(0))
    return b.version


def test_prototypes_mean_of_raw_descriptors_then_normalise():
    names, P = small_bank().prototypes()
    assert names == ["cat", "dog"] and P.dtype == torch.float32 and P.shape == (2, 4)
    # cat: mean([1,0,0,0], [0,2,0,0]) = [0.5, 1, 0, 0] -> / sqrt(1.25); dog: one shot [0,0,3,0] -> e2
    s = math.sqrt(1.25)
    assert torch.allclose(P, torch.tensor([[0.5 / s, 1 / s, 0, 0], [0, 0, 1, 0]]), atol=1e-7)


def test_prototypes_unequal_shots_and_empty_bank():
    bank = MemoryBank()
    bank.add("a", "1", [3.0, 0, 0, 0])
    for i, v in enumerate(([0, 1.0, 0, 0], [0, 3.0, 0, 0], [0, 2.0, 4.0, 0])):
        bank.add("b", f"b{i}", v)
    _, P = bank.prototypes(device="cpu")
    mean_b = np.array([0, 2.0, 4.0 / 3, 0])
    assert np.allclose(P[1].numpy(), mean_b / np.linalg.norm(mean_b), atol=1e-7)
    assert np.allclose(P[0].numpy(), [1, 0, 0, 0])
    names, P0 = MemoryBank().prototypes()
    assert names == [] and P0.shape[0] == 0


def test_version_is_a_content_hash():
    empty = MemoryBank().version
    assert empty == "437630afbe11" and len(empty) == 12    # fixed for an empty bank
    a = small_bank()
    b = MemoryBank()
    b.add("dog", "r3", e(2, scale=3.0), group=11)
    b.add("cat", "r2", e(1, scale=2.0), group=10)
    b.add("cat", "r1", e(0), group=10)
    assert a.version == b.version and int(a.version, 16) >= 0
    before = a.version
    a.add("cat", "r4", e(3))
    assert a.version != before
    a.remove("r4")
    assert a.version == before
    for edit in (lambda x: x.add("cat", "r1", e(0, scale=1.5), 10),  # new descriptor
                 lambda x: x.add("dog", "r1", e(0), 10),             # new class
                 lambda x: x.add("cat", "r1", e(0), 99),             # new group
                 lambda x: x.remove_group(10)):
        c = small_bank()
        edit(c)
        assert c.version != before


def test_bytes_and_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    bank = MemoryBank()
    for i in range(50):
        bank.add(f"class{i % 7}", f"ann{i}-0", rng.normal(size=1024).astype(np.float32), group=i // 2)
    data = bank.to_bytes()
    per_ref = len(data) / len(bank)
    print(f"memory bank: {per_ref:.0f} bytes per reference (D=1024)")
    assert per_ref < 8192
    assert b"pickle" not in data
    copy = MemoryBank.from_bytes(data)
    assert copy.version == bank.version and copy.dim == 1024 and copy.classes == bank.classes
    assert torch.equal(copy.prototypes()[1], bank.prototypes()[1])
    path = tmp_path / "bank.npz"
    bank.save(path)
    bank.save(path)                                      # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.npz"]   # no temp files left
    loaded = MemoryBank.load(path)
    assert loaded.version == bank.version
    assert loaded.remove_group(0) == 2 and "ann0-0" not in loaded and "ann1-0" not in loaded
    first = loaded.refs("class1")[0]                     # sorted by ref_id: ann15-0 (ann1-0 removed)
    assert (first.ref_id, first.group) == ("ann15-0", "7")
    empty = MemoryBank.from_bytes(MemoryBank().to_bytes())
    assert len(empty) == 0 and empty.version == MemoryBank().version


def test_corrupt_data_is_a_value_error(tmp_path):
    good = small_bank().to_bytes()
    path = tmp_path / "bank.npz"
    for bad in (b"", b"not a bank at all", good[: len(good) // 2]):
        path.write_bytes(bad)
        with pytest.raises(ValueError, match="corrupt memory bank"):
            MemoryBank.load(path)
    buf = io.BytesIO()   # well-formed npz whose metadata disagrees with the descriptors
    np.savez(buf, descriptors=np.zeros((2, 4), np.float32),
             meta=np.frombuffer(json.dumps({"format": 1, "dim": 4, "refs": []}).encode(), np.uint8))
    with pytest.raises(ValueError, match="corrupt memory bank data: 0 references"):
        MemoryBank.from_bytes(buf.getvalue())
