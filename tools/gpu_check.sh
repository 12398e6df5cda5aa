#!/usr/bin/env bash
# The GPU check in one call; what it runs and writes: tools/gpu_check.py's docstring.
#   bash tools/gpu_check.sh OUT_DIR             # one CUDA GPU, <= 8 minutes -> OUT_DIR/summary.json + PNGs
#   bash tools/gpu_check.sh OUT_DIR --dry-run   # the same code on the CPU at tiny sizes (< 25 s)
set -euo pipefail
cd "$(dirname "$0")/.."
# PYTHON: the interpreter (default: the first python on PATH), e.g. PYTHON=.venv/bin/python
exec "${PYTHON:-python}" tools/gpu_check.py "$@"
