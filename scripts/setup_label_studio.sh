#!/usr/bin/env bash
# Install Label Studio 1.23.2 into its own venv (cached outside the checkout) for end-to-end tests.
# Prints the venv path on the last line of stdout.
set -euo pipefail
LS_VERSION=${LS_VERSION:-1.23.2}
CACHE=${NTT_CACHE_DIR:-$HOME/.cache/ntt-ls-backend}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV="$CACHE/label-studio-$LS_VERSION"
if [ ! -f "$VENV/.complete" ]; then
  echo "installing label-studio==$LS_VERSION into $VENV (~1 min, ~1 GB)" >&2
  rm -rf "$VENV"; mkdir -p "$CACHE"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q "label-studio==$LS_VERSION" >&2
  touch "$VENV/.complete"
fi
echo "$VENV"
