#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv, cached outside the checkout and keyed by the
# hash of the requirement files, so a second run (or CI on the same machine) costs nothing.
# Usage: scripts/setup_env.sh [--dev]    -> prints the venv path on the last line of stdout.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${NTT_CACHE_DIR:-$HOME/.cache/ntt-ls-backend}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
FILES=("$HERE/requirements.txt" "$HERE/scripts/setup_env.sh")
DEV=0
if [ "${1:-}" = "--dev" ]; then DEV=1; FILES+=("$HERE/requirements-dev.txt"); fi
KEY=$(cat "${FILES[@]}" | sha256sum | cut -c1-16)
VENV="$CACHE/venv-$KEY"
if [ ! -f "$VENV/.complete" ]; then
  echo "setting up $VENV (first run: ~2 min, ~6 GB)" >&2
  rm -rf "$VENV"; mkdir -p "$CACHE"
  "$PY" -m venv "$VENV"
  P="$VENV/bin/pip"
  "$P" install -q --upgrade "pip<26" setuptools wheel >&2
  # 1) torch first (a CUDA build that also runs on CPU), 2) sam2 without its CUDA extension and
  # without build isolation (else it downloads another torch into a temp build env), 3) the rest.
  "$P" install -q "$(grep '^torch==' "$HERE/requirements.txt")" "$(grep '^torchvision==' "$HERE/requirements.txt")" >&2
  SAM2_BUILD_CUDA=0 "$P" install -q --no-build-isolation "$(grep '^sam2==' "$HERE/requirements.txt")" >&2
  "$P" install -q -r "$HERE/requirements.txt" >&2
  if [ "$DEV" = 1 ]; then "$P" install -q -r "$HERE/requirements-dev.txt" >&2; fi
  touch "$VENV/.complete"
fi
ln -sfn "$VENV" "$HERE/.venv"
echo "$VENV"
