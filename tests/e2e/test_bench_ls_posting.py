"""bench/bench_ls_posting.py runs against a real Label Studio (keeps the script from breaking).

The script itself checks after every round that each task holds exactly one prediction, of the last
version posted (PATCH per task, and the bulk import + old-version delete of backend.bulk_delivery),
and deletes its project; here it runs on 20 tasks (the bulk minimum) and its table is read back.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.e2e.ls_harness import LEGACY_TOKEN, LabelStudio

ROOT = Path(__file__).resolve().parents[2]


def test_posting_bench_against_real_label_studio(label_studio: LabelStudio) -> None:
    out = subprocess.run(
        [sys.executable, "bench/bench_ls_posting.py", "--ls-url", label_studio.url, "--api-key", LEGACY_TOKEN,
         "--tasks", "20", "--concurrency", "1,3", "--rounds", "1"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert LEGACY_TOKEN not in out.stdout + out.stderr
    rows = re.findall(r"^\s+(\d+|bulk)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x", out.stdout, re.M)
    assert [r[0] for r in rows] == ["1", "3", "bulk"] and all(float(r[1]) > 0 for r in rows), out.stdout
    projects = label_studio.client().call("GET", "/api/projects/")
    titles = [p["title"] for p in (projects["results"] if isinstance(projects, dict) else projects)]
    assert "ntt posting bench" not in titles  # cleaned up
