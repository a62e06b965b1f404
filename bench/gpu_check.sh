#!/usr/bin/env bash
# The CUDA path on one NVIDIA GPU, in one command of under ten minutes (bench/gpu_check.py says how):
#
#     bash bench/gpu_check.sh --prepare DIR              # here, with PyPI: the kit for an offline GPU machine
#     bash bench/gpu_check.sh --kit DIR --out OUT         # on the GPU machine, DIR copied along
#     bash bench/gpu_check.sh --cpu-dry-run --out OUT     # every step on the CPU, tiny (the test suite runs it)
#
# PYTHON picks the interpreter (default: python, else python3). Installs nothing unless --kit is given.
set -euo pipefail
PY=${PYTHON:-$(command -v python || command -v python3 || true)}
[ -n "$PY" ] || { echo "gpu_check: no python or python3 on PATH (set PYTHON=/path/to/python)" >&2; exit 2; }
exec "$PY" "$(dirname "${BASH_SOURCE[0]}")/gpu_check.py" "$@"
