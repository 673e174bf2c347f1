#!/usr/bin/env bash
# Sets up (idempotent), checks format, lint and types, then runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/check.sh
# The 25 slowest tests, every run: the suite has a time budget (CONTRIBUTING.md, "Tests").
exec .venv/bin/python -m pytest --durations=25 "$@"
