#!/usr/bin/env bash
# Quick start 1: set up .venv (first run only) and run the whole pipeline on a dataset.
#   ./scripts/pipeline.sh --data-root PATH [any `age-detect train` option]
# Without a GPU the packaged CPU recipe is used (see `age-detect pipeline --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec .venv/bin/age-detect pipeline "$@"
