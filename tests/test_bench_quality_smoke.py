"""bench/quality_synthetic.py --quick, so the synthetic quality benchmark cannot rot unnoticed: the
table must be complete and hold what the run must have done (the injected proposals find the
shapes, a threshold only removes detections, the correction round made negatives)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("soft merge (the method)", "graph diffusion", "graph diffusion, normalised")
NEGATIVES = ("soft + negatives suppress", "soft + negatives suppress-nearest")


def test_quality_synthetic_quick_prints_a_consistent_table():
    proc = subprocess.run([sys.executable, "bench/quality_synthetic.py", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:] + out
    assert "scenes: 16 images 192x256 (seed 0): 3 references (12 reference regions), 5 calibration" in out, out
    within, cross = map(float, re.search(r"within a class mean (-?[\d.]+) .* across classes mean (-?[\d.]+)",
                                         out).groups())
    assert within > cross + 0.3, out                       # the re-drawn DINOv2 separates the shapes
    negatives = int(re.search(r"correction round: (\d+) negatives", out).group(1))
    assert negatives > 0, out

    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(.{34})(.{22})\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", line)
        if m:
            rows[(m[1].strip(), m[2].strip())] = tuple(float(v) for v in m.groups()[2:])
    expected = {(v, t) for v in VARIANTS for t in ("none (all, K=100)", "fixed 0.5", "calibrated")}
    expected |= {(v, t) for v in NEGATIVES for t in ("fixed 0.5", "calibrated (soft's)")}
    assert set(rows) == expected, out
    for ap, ap50, recall, false in rows.values():
        assert 0 <= ap <= ap50 <= 1 and 0 <= recall <= 1 and false >= 0
    # the whole-object proposals are there: the method finds most shapes (noise would give ~0)
    assert rows[(VARIANTS[0], "none (all, K=100)")][0] > 0.3, out
    for v in VARIANTS:   # a threshold keeps a subset, best-scored first: fewer matches and false regions
        everything, fixed = rows[(v, "none (all, K=100)")], rows[(v, "fixed 0.5")]
        assert fixed[2] <= everything[2] and fixed[3] <= everything[3], out
