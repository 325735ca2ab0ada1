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
try:
    s = Settings.from_env()
except SettingsError as exc:
    raise SystemExit(f"configuration error: {exc}")
if not s.random_weights:
    print(s.sam_model, s.sam_checkpoint)
    print(s.dino_model, s.dino_checkpoint)
PY
); then
  exit 2
fi

MISSING=()
FAILED=()
while read -r model path; do
  [ -n "${model:-}" ] || continue
  [ -s "$path" ] || MISSING+=("$model=$path")
done <<<"$CKPTS"

for item in "${MISSING[@]}"; do
  model=${item%%=*}; path=${item#*=}
  case "$model" in sam2*) args=(--sam "$model" --dino none) ;; *) args=(--sam none --dino "$model") ;; esac
  echo "checkpoint of $model missing: downloading the official file (once)" >&2
  "$PY" -m model.checkpoints "${args[@]}" --dir "$(dirname "$path")" >&2 || true
  if [ ! -s "$path" ]; then
    url=$("$PY" -c "import sys; from model.checkpoints import checkpoint_url as u; print(u(sys.argv[1]))" "$model")
    FAILED+=("  $path"$'\n'"      from $url")
  fi
done

if [ -n "${FAILED[*]:-}" ]; then
  {
    echo
    echo "Could not fetch these checkpoints (no internet access?):"
    printf '%s\n' "${FAILED[@]}"
    echo "Copy them there, or point NTT_SAM_CHECKPOINT / NTT_DINO_CHECKPOINT at files you have"
    echo "(MODEL_DIR=$MODEL_DIR; NTT_SAM_MODEL / NTT_DINO_MODEL choose other models, e.g. sam2.1-t and"
    echo "dinov2-s; NTT_RANDOM_WEIGHTS=1 runs the plumbing with meaningless random weights)."
  } >&2
  exit 1
fi

if [ "$ROLE" = worker ]; then
  exec "$PY" -m backend.worker "${@:2}"
fi
exec "$VENV/bin/gunicorn" --bind "0.0.0.0:${PORT:-9090}" --workers 1 --threads 8 --timeout 0 _wsgi:app
