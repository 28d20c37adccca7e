#!/usr/bin/env bash
# The test command (README, .ci/run): set-up, lint, type-check the library, then the whole suite with notebooks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m ruff check .
"$PY" -m mypy ghostfunc
"$PY" -m pytest "$@"
