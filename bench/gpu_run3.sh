#!/usr/bin/env bash
# Third prepared device run (issue 5), after the refresh speed-ups: first `bench/build_device_wheels.sh`
# here, then run this on the device with carry [".whl"]. About 8 minutes:
#  1. refresh of 1,000 realistic cached tasks on CUDA (cache format 3) and 100 on the device's CPU;
#  2. the SAM2-L decoder: time per point batch size, top operators, torch.compile (time + drift);
#  3. the cold path per stage, fp32, bf16, and bf16 with the compiled decoder (NTT_COMPILE_DECODER).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
timeout 90 python3 bench/gpu_refresh.py --tasks 1000 --proposals 300 --device cuda 2>&1 | tee "$OUT/gpu_refresh_cuda.log"
timeout 60 python3 bench/gpu_refresh.py --tasks 100 --proposals 300 --device cpu --out /tmp/ntt_refresh_cpu 2>&1 \
  | tee "$OUT/gpu_refresh_cpu.log"
timeout 150 python3 bench/profile_decoder.py --sam sam2-l --device cuda --batches 32,64,128,256 --compile 2>&1 \
  | tee "$OUT/profile_decoder.log"
timeout 75 python3 bench/bench_model.py --sam sam2-l --dino dinov2-l --random-weights --device cuda \
  --image-size 768x1024 --repeat 3 --no-cache-stages 2>&1 | tee "$OUT/bench_model_cuda_fp32.log"
timeout 75 python3 bench/bench_model.py --sam sam2-l --dino dinov2-l --random-weights --device cuda \
  --image-size 768x1024 --repeat 3 --bf16 --no-cache-stages 2>&1 | tee "$OUT/bench_model_cuda_bf16.log"
timeout 120 python3 bench/bench_model.py --sam sam2-l --dino dinov2-l --random-weights --device cuda \
  --image-size 768x1024 --repeat 3 --bf16 --compile-decoder --no-cache-stages 2>&1 | tee "$OUT/bench_model_cuda_bf16_compiled.log"
