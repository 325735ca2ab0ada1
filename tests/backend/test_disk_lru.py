"""DiskLRU: the bound holds with several writers on one folder; kept files are never evicted."""
from __future__ import annotations

from backend.storage.disk_lru import DiskLRU


def test_writers_sharing_a_folder_evict_the_oldest_files_of_both(tmp_path):
    a = DiskLRU(tmp_path, max_bytes=350, patterns=("*.bin",))
    b = DiskLRU(tmp_path, max_bytes=350, patterns=("*.bin",))
    for i, lru in enumerate((a, b, a)):
        lru.write(tmp_path / f"{i}.bin", bytes(100))
    assert a.read(tmp_path / "0.bin") == bytes(100)  # 0 is now the most recent
    a.write(tmp_path / "3.bin", bytes(100))  # a counted only its own 300 bytes: over the bound later
    assert a.total_bytes() == 400
    a.write(tmp_path / "4.bin", bytes(100))  # a's count passes the bound: it scans b's files too
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["0.bin", "3.bin", "4.bin"]
    assert a.total_bytes() == 300


def test_kept_files_stay_even_when_oldest(tmp_path):
    lru = DiskLRU(tmp_path, max_bytes=150, patterns=("*.bin",))
    lru.write(tmp_path / "entry.bin", bytes(100))
    lru.write(tmp_path / "side.bin", bytes(100), keep=(tmp_path / "entry.bin",))
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["entry.bin", "side.bin"]
    lru.write(tmp_path / "new.bin", bytes(100))
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["new.bin"]
    assert lru.read(tmp_path / "entry.bin") is None
