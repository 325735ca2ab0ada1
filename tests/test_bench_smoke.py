"""bench/bench_refresh.py end to end with tiny sizes, so the benchmark cannot rot unnoticed.

One subprocess run (tiny models and images, N = 2 and 4 cached tasks, one RQ worker on the real
Redis, one job); the assertions check the printed table against what the run must have done: the
cache hit recomputed nothing and matched the cold result, every cached task was re-scored without
a SAM2/DINOv2 run, the posted count equals the changed count, the fit names both N.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _row(out: str, name: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith(name)]
    assert len(lines) == 1, f"row {name!r} missing or repeated in:\n{out}"
    return lines[0]


def test_bench_refresh_prints_its_table():
    cmd = [sys.executable, "bench/bench_refresh.py", "--images", "1", "--tasks", "2,4", "--jobs", "1",
           "--workers", "1", "--refresh-threads", "2", "--points-per-side", "2", "--image-size", "48x64", "--dino-image-size", "112",
           "--redis-url", os.environ.get("NTT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:] + out

    assert "sam2.1-t @ 256 + dinov2-s @ 112, grid 2x2, image 48x64" in out
    assert re.search(r"machine: \d+ CPU cores", out)
    cold = float(re.search(r"([\d.]+) s", _row(out, "cold prediction per image")).group(1))
    hit_row = _row(out, "cache-hit re-score per image")
    hit = float(re.search(r"([\d.]+) s", hit_row).group(1))
    assert 0 < hit and 0 < cold and "propose ran on 0" in hit_row  # their order is a timing: printed, not asserted
    ratio_row = _row(out, "cold / cache-hit ratio")
    assert "identical results on 1/1 images" in ratio_row
    assert abs(float(re.search(r"([\d.]+)x", ratio_row).group(1)) - cold / hit) <= 0.05 * cold / hit + 0.1

    for n in (2, 4):
        row = _row(out, f"webhook -> predictions posted, N={n} ")
        rescored, changed, posted = map(int, re.search(r"(\d+) re-scored, (\d+) changed, (\d+) posted", row).groups())
        assert rescored == posted == n and changed <= n  # every task gets the new version
    assert "over N = 2, 4" in _row(out, "refresh growth with N (linear fit)")
    threads = _row(out, "re-score N=4, 2 vs 1 threads")
    ratio, many, one = map(float, re.search(r"x([\d.]+)\s+([\d.]+) s vs ([\d.]+) s", threads).groups())
    rounding = 0.005 + one / many * (0.0005 / many + 0.0005 / one)  # printed to 2 and 3 decimals
    assert many > 0 and one > 0 and abs(ratio - one / many) <= rounding

    # breakdown: N, total, bank, re-score, read, match, convert ("-" with 2 threads: read and match
    # are thread-seconds), posting, fake LS, other, ms/task, posted, proposed
    num = r"(-?[\d.]+)"
    rows = re.findall(r"^\s+([24])\s+" + r"\s+".join([num] * 5 + ["(-)"] + [num] * 4) + r"\s+(\d+)\s+(\d+)$",
                      out, re.M)
    assert [r[0] for r in rows] == ["2", "4"], out
    for r in rows:
        total, parts = float(r[1]), [float(v) for v in (r[2], r[3], r[7], r[9])]
        assert abs(total - sum(parts)) < 3e-3 and r[-1] == "0"  # no proposals computed in a refresh

    bank = _row(out, "bank bytes per reference")
    assert int(re.search(r"(\d+) B", bank).group(1)) < 4 * 384 + 2048  # float32 descriptor + small overhead
    assert "5.6 MB with DINOv2-L" in bank
    assert re.search(r"peak memory, this process\s+\d+ MiB", out)
    assert re.search(r"peak memory, one worker\s+\d+ MiB", out)
    assert re.search(r"throughput, 1 RQ worker\(s\)\s+[\d.]+ img/s\s+1 predict jobs", out)


def test_bench_variants_prints_every_variant():
    """bench/bench_variants.py at tiny sizes: one row per (merge, negatives) variant, each with its
    timings, the suppression counted only when negatives are used."""
    cmd = [sys.executable, "bench/bench_variants.py", "--proposals", "30", "--low", "64", "--image-size", "60x80",
           "--dim", "16", "--classes", "3", "--shots", "2", "--negatives", "6", "--repeat", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout
    rows = re.findall(r"^(soft|graph|graph-normalised)\s+(off|suppress|suppress-nearest)\s+[\d.]+\s+[\d.]+\s+(\d+)"
                      r"\s+(\d+)$", proc.stdout, re.M)
    assert len(rows) == 9 and len({(m, n) for m, n, _, _ in rows}) == 9, proc.stdout
    assert all(int(dets) > 0 for _, _, dets, _ in rows)
    assert all((n == "off") == (s == "0") for _, n, _, s in rows), proc.stdout
