#!/usr/bin/env bash
# The GPU check as one prepared script, for a lent GPU machine or any CUDA host:
#   bash bench/gpu_check.sh [CIFAR-10 path]
# The path defaults to $RD3_DATA_CIFAR10, else ../shared/data/cifar10-jpeg.tar.gz
# (on a machine where ../shared does not exist, copy the tarball into an ignored
# folder of the checkout and pass its path). Installs the project into a venv
# when it is not importable, prints the GPU, runs bench/gpu_check.py, and keeps
# its log in $OUT (or /tmp). The figures are its last output line (JSON).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, ray, rd3core" 2>/dev/null; then
  "$PY" -m venv /tmp/rd3-gpu-venv
  PY=/tmp/rd3-gpu-venv/bin/python
  "$PY" -m pip install -q -e .
fi
DATA=${1:-${RD3_DATA_CIFAR10:-../shared/data/cifar10-jpeg.tar.gz}}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: no GPU visible"
PYTHONUNBUFFERED=1 "$PY" bench/gpu_check.py --data "$DATA" 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
