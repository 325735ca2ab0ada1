"""bench/bookkeeping.py end to end on this checkout with N = 20, so the bookkeeping benchmark cannot
rot unnoticed: the backend really started (scripts/run_backend.sh, embedded default), the
START_TRAINING job really posted a prediction for each task and finished, and the bytes it wrote
were measured."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N = 20


def test_bookkeeping_bench_prints_its_row(tmp_path):
    cmd = [sys.executable, "bench/bookkeeping.py", "--checkout", f"this={ROOT}", "--tasks", str(N),
           "--max-seconds", "240", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:] + out

    table = out.split("== START_TRAINING bookkeeping", 1)[1]
    rows = re.findall(r"^this (\S+)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)"
                      r"\s+([\d.]+)\s+(\S+)$", table, re.M)
    assert len(rows) == 1, out
    commit, n, predicted, total_s, ms_per_task, mb_written, kb_per_task, _, _, job = rows[0]
    assert (int(n), int(predicted), job) == (N, N, "finished"), out  # every task got its prediction
    assert float(total_s) > 0 and float(ms_per_task) > 0, out
    assert float(mb_written) > 0 and float(kb_per_task) > 0, out  # the registry reached the disk
    assert "EXTRAPOLATED" not in out, out
