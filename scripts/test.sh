#!/usr/bin/env bash
# Quick start 2: set up .venv with the test extras (first run only) and run the default test suite.
#   ./scripts/test.sh [pytest options]      (slow tests: ./scripts/test.sh -m slow)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test source scripts/venv.sh
# Lint and formatting first (seconds): the same rules as pyproject's [tool.ruff].
.venv/bin/ruff check src tests benchmarks scripts check_your_age.py
.venv/bin/ruff format --check src tests benchmarks scripts check_your_age.py
exec .venv/bin/python -m pytest -m "not slow" "$@"
