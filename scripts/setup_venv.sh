#!/usr/bin/env bash
# Create .venv/ at the repo root and install wrpo-kernels with its dev extra.
# On a machine without an NVIDIA GPU, torch comes from the CPU wheel index (no multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  .venv/bin/pip install -q "torch>=2.4,<2.15"
else
  .venv/bin/pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
.venv/bin/pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, wrpo_kernels; print('wrpo-kernels', wrpo_kernels.__version__, '| torch', torch.__version__)"
