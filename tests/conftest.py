"""Test-session environment, set before any backend module reads its settings.

* no network: HF_HUB_OFFLINE=1; one CPU thread per test process (2-core CI box).
* small random-weight models (SAM2.1-T at 256 px, DINOv2-S at 112 px, 2x2 point grid, eager decoder).
* a fresh MODEL_DIR and a unique queue/key prefix per session, so concurrent sessions and a
  developer's real deployment on the same Redis never see each other's keys.
* no Redis, Label Studio or basic-auth settings leak in from the shell: tests that need Redis
  take NTT_TEST_REDIS_URL (default redis://127.0.0.1:6379/0) and set REDIS_URL themselves.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid

for _name in ("REDIS_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "LABEL_STUDIO_API_KEY",
              "LABEL_STUDIO_ACCESS_TOKEN", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "CACHE_DIR",
              "LOCAL_FILES_DOCUMENT_ROOT", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"):
    os.environ.pop(_name, None)

_MODEL_DIR = tempfile.mkdtemp(prefix="ntt-test-")
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "MODEL_DIR": _MODEL_DIR,
    "NTT_QUEUE_PREFIX": f"ntt-test-{uuid.uuid4().hex[:10]}",
})
for _name, _value in {
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    "NTT_RANDOM_WEIGHTS": "1", "NTT_DEVICE": "cpu",
    "NTT_SAM_MODEL": "sam2.1-t", "NTT_DINO_MODEL": "dinov2-s",
    "NTT_SAM_IMAGE_SIZE": "256", "NTT_DINO_IMAGE_SIZE": "112", "NTT_POINTS_PER_SIDE": "2",
    "NTT_COMPILE_DECODER": "0",  # the eager decoder: no compile in every test process (tests/model checks it)
    "NTT_TEST_REDIS_URL": "redis://127.0.0.1:6379/0",
}.items():
    os.environ.setdefault(_name, _value)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_MODEL_DIR, ignore_errors=True)
