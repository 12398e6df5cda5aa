#!/usr/bin/env bash
# The GPU check in one call; what it runs and writes: tools/gpu_check.py's docstring.
#   bash tools/gpu_check.sh OUT_DIR                  # one CUDA GPU, <= 8 minutes -> OUT_DIR/summary.json + PNGs
#   bash tools/gpu_check.sh OUT_DIR --data_dir=DIR   # the CIFAR-10 subset elsewhere (default: ../shared/data/
#                                                    # cifar10-subset, else data/cifar10-subset in the repository)
#   bash tools/gpu_check.sh OUT_DIR --dry-run        # the same code on the CPU at tiny sizes
# Relative paths are the caller's (the check changes into the repository after reading them).
set -euo pipefail
# PYTHON: the interpreter, e.g. PYTHON=.venv/bin/python. Else python3, then python: python3 is Python 3
# wherever it exists (an activated virtual environment has it too), while `python` is missing on many
# bare systems and Python 2 on some older ones.
PY="${PYTHON:-$(command -v python3 || command -v python || true)}"
if [ -z "$PY" ]; then
    echo "error: no python3 or python on PATH; set PYTHON=/path/to/python" >&2
    exit 2
fi
exec "$PY" "$(dirname "$0")/gpu_check.py" "$@"
