"""bench/click_backend.py end to end with tiny sizes, so the click benchmark cannot rot unnoticed.

One subprocess run: both modes (embedded thread; one RQ worker on the real Redis), clicks alone and
during a Start-training job; the assertions check the printed table against what the run must have
done: every scenario measured the clicks asked for, warm clicks ran no image encoder, the batch
job was running while they were measured and then finished.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_click_backend_prints_its_table():
    cmd = [sys.executable, "bench/click_backend.py", "--modes", "embedded,rq", "--sam-image-size", "256",
           "--dino-image-size", "112", "--points-per-side", "2", "--image-size", "48x64", "--cold", "2",
           "--warm", "3", "--batch-tasks", "200", "--gap", "0.05",
           "--redis-url", os.environ.get("NTT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:] + out

    assert "sam2-t @ 256 + dinov2-s @ 112, image 48x64, batch grid 2x2" in out
    assert re.search(r"machine: \d+ CPU cores.*load average [\d.]+ at start", out)
    rows = re.findall(r"^(embedded|rq)\s+(alone|during train)\s+(cold|warm)\s+p50\s+([\d.]+) ms\s+p95\s+([\d.]+) ms"
                      r"\s+n\s+(\d+)", out, re.M)
    assert [(m, s, e) for m, s, e, *_ in rows] == [
        (m, s, e) for m in ("embedded", "rq") for s in ("alone", "during train") for e in ("cold", "warm")], out
    for *_, p50, p95, n in rows:
        assert 0 < float(p50) <= float(p95)
    assert [int(n) for *_, n in rows] == [2, 3, 2, 3] * 2  # no batch ended before its clicks
    assert "embedded: alone: SAM2 image encoder ran 2 times for 2 cold clicks, 0 times for 3 warm clicks" in out
    for mode in ("embedded", "rq"):
        batch = re.search(rf"{mode}: during Start training: (\d+) batch tasks predicted while clicking, "
                          r"[\d.]+ s per task \(clicks included\); job finished", out)
        assert batch and int(batch.group(1)) >= 1, out  # the clicks were served while the job ran
