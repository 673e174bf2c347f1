# Everyday commands. The README's two commands are the source of truth; these call the same scripts.
.PHONY: setup run test unit lint format

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/expertserve validate experts/*

test:
	bash scripts/test.sh -q

unit:
	.venv/bin/python -m pytest -q tests/unit

lint:
	.venv/bin/ruff check expertserve tests

format:
	.venv/bin/ruff format expertserve tests
