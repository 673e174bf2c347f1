#!/usr/bin/env bash
# Sets up (idempotent), checks format, lint and types, then runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/check.sh
# The 25 slowest tests, every run: the suite has a time budget (CONTRIBUTING.md, "Tests").
# EXPERTSERVE_TEST_WORKERS=N runs N pytest-xdist workers, each module (or group of modules sharing a server) whole on
# one worker (tests/conftest.py). Off by default: on 2 cores the suite's heaviest tests (Ray Train, the two-node
# cluster, vLLM's engine processes) slowed each other down more than two lanes saved (load average 47 seen).
WORKERS=${EXPERTSERVE_TEST_WORKERS:-0}
if [ "$WORKERS" = 0 ]; then
    exec .venv/bin/python -m pytest --durations=25 "$@"
fi
exec .venv/bin/python -m pytest --durations=25 -n "$WORKERS" --dist loadgroup "$@"
