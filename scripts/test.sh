#!/usr/bin/env bash
# Sets up (idempotent), checks format, lint and types, then runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/check.sh
# The 25 slowest tests, every run: the suite has a time budget (CONTRIBUTING.md, "Tests"). Two workers: most of
# the suite waits on one process at a time (a server starting, Ray Train's set-up), so two lanes share the 2 cores
# well; each module (or group of modules sharing a server) runs whole on one worker (tests/conftest.py).
# EXPERTSERVE_TEST_WORKERS=0 runs everything in this process, one test after another.
WORKERS=${EXPERTSERVE_TEST_WORKERS:-2}
if [ "$WORKERS" = 0 ]; then
    exec .venv/bin/python -m pytest --durations=25 "$@"
fi
exec .venv/bin/python -m pytest --durations=25 -n "$WORKERS" --dist loadgroup "$@"
