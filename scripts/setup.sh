#!/usr/bin/env bash
# One-time set-up on a fresh machine: a CPU build of torch where none is present,
# then ghostfunc with its dev extra (tests, demo, benchmarks, notebooks).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  # A bare `torch` requirement would pull a multi-GB CUDA build: take the CPU one first.
  "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
"$PY" -m pip install -q -e ".[dev]"
