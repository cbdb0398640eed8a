#!/usr/bin/env bash
# Create or reuse .venv with the pinned dependency tree (requirements.lock).
# Sourced by run_local.sh and run_tests.sh. A stamp file holds a digest of the
# lock and setup.py: when neither changed, nothing is installed (a second run
# takes seconds); when either changed, pip brings the venv to the pins.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CBIR_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
STAMP="$VENV/.cbir-installed"
want="$(cat "$ROOT/requirements.lock" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version 2>&1)" >&2
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing pinned dependencies (first run: a few minutes, about 2.7 GB)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade "pip==26.3" >&2
  "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements.lock" >&2
  "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT" >&2
  echo "$want" > "$STAMP"
else
  echo "[setup] reusing $VENV (dependencies unchanged)" >&2
fi
export PATH="$VENV/bin:$PATH"
