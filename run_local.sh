#!/usr/bin/env bash
# The whole job end to end on the DirectRunner: extract → index → query.
#   ./run_local.sh [--input DIR] [--output DIR] [--model NAME] [any Beam pipeline option]
# With no --input it runs on a built-in sample corpus (see README).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
# Offline machines: use the shared weights folder when nobody chose one.
if [ -z "${CBIR_WEIGHTS_DIR:-}" ] && [ -d ../shared/models/keras ]; then
  export CBIR_WEIGHTS_DIR="$(cd ../shared/models/keras && pwd)"
fi
exec python -m pipelines.demo "$@"
