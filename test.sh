#!/usr/bin/env bash
# Run the whole test suite, end-to-end tests against a real Label Studio included. See README.
exec "$(dirname "$0")/scripts/test.sh" "$@"
