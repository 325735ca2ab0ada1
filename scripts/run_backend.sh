#!/usr/bin/env bash
# Start the backend the documented way (README "Run the backend").
#   scripts/run_backend.sh [web]   gunicorn web process; without REDIS_URL it also runs the jobs on
#                                  an in-process worker thread (the embedded default)
#   scripts/run_backend.sh worker  one RQ worker (needs REDIS_URL); start one per GPU
# Creates/reuses the venv, fetches the configured checkpoints when missing (unless
# NTT_RANDOM_WEIGHTS=1), then execs the server. Every setting is an env var (README table).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROLE=${1:-web}
case "$ROLE" in web|worker) ;; *) echo "usage: $0 [web|worker]" >&2; exit 2 ;; esac
cd "$ROOT"

VENV=$(scripts/setup_env.sh --dev | tail -n 1)   # one venv for running and testing (+3 small test packages)
PY="$VENV/bin/python"
export MODEL_DIR=${MODEL_DIR:-$ROOT/data}

# Which checkpoint files the settings point at (also validates every env var up front).
if ! CKPTS=$("$PY" - <<'PY'
from backend.settings import Settings, SettingsError
from model.catalog import checkpoint_filename, checkpoint_url
try:
    s = Settings.from_env()
except SettingsError as exc:
    raise SystemExit(f"configuration error: {exc}")
if not s.random_weights:
    for model, path in ((s.sam_model, s.sam_checkpoint), (s.dino_model, s.dino_checkpoint)):
        print(model, path, checkpoint_filename(model), checkpoint_url(model))
PY
); then
  exit 2
fi

FAILED=()
while read -r model path official url; do
  [ -n "${model:-}" ] && [ ! -s "$path" ] || continue
  if [ "$(basename "$path")" = "$official" ]; then  # the official file: fetch it (once)
    case "$model" in sam2*) args=(--sam "$model" --dino none) ;; *) args=(--sam none --dino "$model") ;; esac
    echo "checkpoint of $model missing: downloading the official file (once)" >&2
    "$PY" scripts/download_checkpoints.py "${args[@]}" --dir "$(dirname "$path")" >&2 || true
  fi
  [ -s "$path" ] || FAILED+=("  $path"$'\n'"      (the official $model file is $official, from $url)")
done <<<"$CKPTS"

if [ -n "${FAILED[*]:-}" ]; then
  {
    echo
    echo "These checkpoint files are missing (an official one could not be fetched: no internet access?):"
    printf '%s\n' "${FAILED[@]}"
    echo "Copy them there, or point NTT_SAM_CHECKPOINT / NTT_DINO_CHECKPOINT at files you have"
    echo "(MODEL_DIR=$MODEL_DIR; NTT_SAM_MODEL / NTT_DINO_MODEL choose other models, e.g. sam2.1-t and"
    echo "dinov2-s; NTT_RANDOM_WEIGHTS=1 runs the plumbing with meaningless random weights)."
  } >&2
  exit 1
fi

if [ "$ROLE" = worker ]; then
  exec "$PY" -m backend.queueing.worker "${@:2}"
fi
exec "$VENV/bin/gunicorn" --bind "0.0.0.0:${PORT:-9090}" --config python:backend.web.gunicorn_conf _wsgi:app
