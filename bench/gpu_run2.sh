#!/usr/bin/env bash
# Second prepared device run: bf16 cold path per stage + refresh of 1,000 realistic cached tasks.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
timeout 100 python3 bench/gpu_refresh.py --tasks 1000 --proposals 300 2>&1 | tee "$OUT/gpu_refresh.log"
timeout 90 python3 bench/bench_model.py --sam sam2-l --dino dinov2-l --random-weights --device cuda \
  --image-size 768x1024 --repeat 3 --bf16 --no-cache-stages 2>&1 | tee "$OUT/bench_model_cuda_bf16.log"
