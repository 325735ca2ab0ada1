"""The posting and live-refresh benchmarks run against a real Label Studio (keeps them from breaking).

The script itself checks after every round that each task holds exactly one prediction, of the last
version posted (PATCH per task, and the bulk import + old-version delete of backend.delivery.bulk),
and deletes its project; here it runs on 20 tasks (the bulk minimum) and its table is read back.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import requests

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


def test_live_refresh_bench_webhook_to_bulk_replaced_predictions(label_studio: LabelStudio, start_backend) -> None:
    """bench/bench_live_refresh.py on 24 tasks: LS's webhook -> our web -> RQ worker -> bulk refresh;
    the script waits until LS holds exactly one prediction of the new version per task and none of
    an older one of ours (so it fails if the refresh is not bulk, or leaves duplicates)."""
    backend = start_backend(label_studio)
    out = subprocess.run(
        [sys.executable, "bench/bench_live_refresh.py", "--ls-url", label_studio.url, "--api-key", LEGACY_TOKEN,
         "--backend-url", backend.url, "--tasks", "24"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    (row,) = re.findall(r"^\s+24\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+\{'(ntt-[^']+)': 24\}$", out.stdout, re.M)
    assert float(row[2]) > 0, out.stdout
    ids = [j["id"] for j in backend.jobs() if j["func"].endswith("refresh_project")]
    results = [requests.get(f"{backend.url}/jobs", params={"id": i}, timeout=5).json().get("result") or {} for i in ids]
    done = [r for r in results if r.get("rescored")]
    assert any(r["bulk"] is True and r["retired"] == 24 and r["posted"] == 24 for r in done), results


def test_live_training_bench_posts_every_unlabelled_task(label_studio: LabelStudio, start_backend) -> None:
    """bench/bench_live_refresh.py --train on 12 tasks: Start training through LS's own /train call,
    the worker posts one prediction of the bank's version to each of the 11 unlabelled tasks."""
    backend = start_backend(label_studio)
    out = subprocess.run(
        [sys.executable, "bench/bench_live_refresh.py", "--ls-url", label_studio.url, "--api-key", LEGACY_TOKEN,
         "--backend-url", backend.url, "--train", "--tasks", "12"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    (row,) = re.findall(r"^\s+12\s+([\d.]+)\s+([\d.]+)\s+\{'(ntt-[^']+)': 11", out.stdout, re.M)
    assert float(row[0]) > 0, out.stdout
