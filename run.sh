#!/usr/bin/env bash
# Run the backend on its embedded default (no Redis needed): http://0.0.0.0:${PORT:-9090}
# `./run.sh worker` starts an RQ worker instead (with REDIS_URL set). See README.
exec "$(dirname "$0")/scripts/run_backend.sh" "$@"
