#!/usr/bin/env bash
# Sets up the pinned .venv (or reuses it) and runs the pytest suite.
#   ./run_tests.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
if [ -z "${CBIR_WEIGHTS_DIR:-}" ] && [ -d ../shared/models/keras ]; then
  export CBIR_WEIGHTS_DIR="$(cd ../shared/models/keras && pwd)"
fi
export CBIR_OFFLINE="${CBIR_OFFLINE:-1}"
# NumPy's BLAS on one thread: the suite's matrices are small, and two BLAS threads contending with
# TensorFlow's on two cores made small SVDs and products 10-100x slower (an ITQ fit 0.5 s -> 10 s).
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
ruff check .
# The floors as import contracts (pyproject.toml [tool.importlinter]); tests/test_import_contracts.py runs
# the same check, so pytest alone catches a breach too. Here it fails fast, before the long suite.
lint-imports --no-cache --no-logo
exec python -m pytest "$@"
