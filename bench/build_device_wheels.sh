#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it has torch, torchvision and timm, no internet): sam2 (built
# here without its CUDA extension, as the project installs it), hydra-core, omegaconf, antlr4,
# iopath, portalocker and pycocotools for the device's Python. Output: .whl/ (git-ignored), which
# the device runs take with `carry: [".whl"]`. Usage: bench/build_device_wheels.sh [python-version]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYV=${1:-3.12}
OUT="$ROOT/.whl"
PIP="$ROOT/.venv/bin/pip"
rm -rf "$OUT"; mkdir -p "$OUT"
SAM2_BUILD_CUDA=0 "$PIP" wheel -q --no-deps --no-build-isolation -w "$OUT" "$(grep '^sam2==' "$ROOT/requirements.txt")"
# the same versions as the project venv (pip freeze), pure-Python wheels except pycocotools
PINS=$("$PIP" freeze 2>/dev/null | grep -i -E '^(hydra-core|omegaconf|iopath|portalocker|antlr4-python3-runtime|pycocotools)==')
# shellcheck disable=SC2086
"$PIP" wheel -q --no-deps -w "$OUT" $(echo "$PINS" | grep -v -i pycocotools)
"$PIP" download -q --no-deps --only-binary=:all: --python-version "$PYV" -d "$OUT" $(echo "$PINS" | grep -i pycocotools)
ls -1 "$OUT"
