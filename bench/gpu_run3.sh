#!/usr/bin/env bash
# Third prepared device run (issue 5), after the refresh speed-ups: first `bench/build_device_wheels.sh`
# here, then run this on the device with carry [".whl"] (at most 600 s of timeouts, ~6 min expected):
#  1. refresh of 500 realistic cached tasks on CUDA and 100 on the device's CPU, each a first refresh and
#     the next one (stored upsampled masks), with 1 and 8 re-score threads (REFRESH_THREADS);
#  2. the SAM2-L decoder: time per point batch size, top operators, torch.compile (time + drift);
#  3. the cold path per stage, fp32, bf16, and bf16 with the compiled decoder (NTT_COMPILE_DECODER).
# Dry run of the plumbing on a CPU machine (tiny sizes, the project venv, no wheels):
#   DRY=1 PY=.venv/bin/python bash bench/gpu_run3.sh
set -uo pipefail
PY=${PY:-python3}
if [ "${DRY:-0}" = 1 ]; then
  DEV=cpu TASKS=20 CPU_TASKS=5 SAM=sam2.1-t DINO=dinov2-s
  SIZES="--sam-image-size 256 --dino-image-size 112 --points-per-side 4 --point-batch 8"
  PROF="--image-size 256 --points-per-side 4 --batches 8,16 --top 5"
else
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:.
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  DEV=cuda TASKS=500 CPU_TASKS=100 SAM=sam2-l DINO=dinov2-l SIZES="" PROF="--batches 32,64,128,256"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee "$OUT/versions.txt"
timeout 120 $PY bench/gpu_refresh.py --tasks "$TASKS" --proposals 300 --device "$DEV" --threads 1,8 2>&1 \
  | tee "$OUT/gpu_refresh_$DEV.log"
timeout 90 $PY bench/gpu_refresh.py --tasks "$CPU_TASKS" --proposals 300 --device cpu --threads 1,8 --out /tmp/ntt_refresh_cpu 2>&1 \
  | tee "$OUT/gpu_refresh_cpu.log"
# shellcheck disable=SC2086
timeout 120 $PY bench/profile_decoder.py --sam "$SAM" --device "$DEV" $PROF --compile 2>&1 | tee "$OUT/profile_decoder.log"
for variant in "fp32:" "bf16:--bf16" "bf16_compiled:--bf16 --compile-decoder"; do
  # shellcheck disable=SC2086
  timeout 90 $PY bench/bench_model.py --sam "$SAM" --dino "$DINO" --random-weights --device "$DEV" $SIZES \
    --image-size 768x1024 --repeat 3 --no-cache-stages ${variant#*:} 2>&1 | tee "$OUT/bench_model_${variant%%:*}.log"
done
