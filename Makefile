# Everyday commands. The README's two commands are the source of truth; these call the same scripts and tools.
.PHONY: setup run test test-fast check lint format typecheck unit integration e2e

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/expertserve validate experts/*

test:  ## everything, as CI runs it (the README's command)
	bash scripts/test.sh -q

test-fast:  ## checks, unit tests and the Serve app on the fake engine (no scaling): under 3 minutes
	bash scripts/check.sh
	.venv/bin/python -m pytest -q tests/unit tests/integration/test_serve_fake_engine.py -m "not scaling" --durations=10

check:  ## format, lint and types, as CI checks them
	bash scripts/check.sh

lint:
	.venv/bin/ruff check expertserve tests

format:
	.venv/bin/ruff format expertserve tests
	.venv/bin/ruff check --fix expertserve tests

typecheck:
	.venv/bin/mypy

unit:  ## pure logic, seconds
	.venv/bin/python -m pytest -q tests/unit

integration:  ## real Ray, Ray Train, vLLM on tiny models; the Serve app on the fake engine
	.venv/bin/python -m pytest -q tests/integration

e2e:  ## `expertserve serve` started as a user starts it, spoken to over HTTP
	.venv/bin/python -m pytest -q tests/e2e
