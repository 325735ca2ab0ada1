#!/usr/bin/env bash
# The prepared device run (see docs/benchmarks.md): install the carried wheels that the GPU image
# lacks (sam2, hydra-core, omegaconf, antlr4, iopath), then run the GPU checks + benchmark.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
timeout 330 python3 bench/gpu_check.py --tasks 1000 2>&1 | tee "$OUT/gpu_check.log"
timeout 120 python3 bench/bench_model.py --sam sam2-l --dino dinov2-l --random-weights --device cuda \
  --image-size 768x1024 --repeat 3 2>&1 | tee "$OUT/bench_model_cuda.log"
