#!/usr/bin/env bash
# Format, lint and type checks (seconds); scripts/test.sh runs them before the tests, and CI fails on any of them.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff format --check expertserve tests
.venv/bin/ruff check expertserve tests
.venv/bin/mypy
