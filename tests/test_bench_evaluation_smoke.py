"""bench/bench_evaluation.py with tiny sizes, so the benchmark cannot rot unnoticed: the printed
rows must add up (matches = tasks x variants + learning curve, percent = per task / cold)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_evaluation_prints_consistent_figures():
    cmd = [sys.executable, "bench/bench_evaluation.py", "--tasks", "6", "--images", "2", "--variants", "1,2",
           "--points-per-side", "2", "--image-size", "48x64", "--dino-image-size", "112"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:] + out
    assert "project: 6 annotated tasks (2 distinct images)" in out
    cold = float(re.search(r"cold prediction per task \(propose \+ match, median of 2\): ([\d.]+) s", out).group(1))
    rows = re.findall(r"evaluation, (\d) variant\(s\): ([\d.]+) s = ([\d.]+) ms/task = ([\d.]+)% of a cold "
                      r"prediction per task; (\d+) matches \(leave-one-out (\d+), learning curve (\d+), "
                      r"points \[1, 2, 4, 5\]\)", out)
    assert [r[0] for r in rows] == ["1", "2"], out
    for n, total, per_task, percent, matches, loo, curve in rows:
        assert int(loo) == 6 * int(n)
        assert int(matches) == int(loo) + int(curve) == int(loo) + 3 * (5 + 4 + 2)   # 3 subsets of 1, 2, 4 tasks
        per_task, percent = float(per_task), float(percent)
        assert abs(per_task - 1000 * float(total) / 6) <= 0.05 + 1000 * 0.0005 / 6 + 1e-9    # printed rounding
        assert abs(percent - per_task / 10 / cold) <= 0.05 + percent * (0.05 / per_task + 0.0005 / cold) + 1e-9
