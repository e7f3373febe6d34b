#!/usr/bin/env bash
# Create .venv/ at the repo root and install wrpo-kernels with its dev extra.
# On a machine without an NVIDIA GPU, torch comes from the CPU wheel index (no multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  .venv/bin/pip install -q "torch>=2.6,<2.15"
else
  # torch alone from the CPU index (no retries: a mirror or local wheel may answer instead);
  # its own dependencies come from the normal index with the project below.
  .venv/bin/pip install -q --no-deps --retries 0 --timeout 15 "torch==2.13.0" \
    --index-url https://download.pytorch.org/whl/cpu 2>&1 | grep -v -e "Retrying" -e "is ignored" || true
fi
.venv/bin/pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, wrpo_kernels; print('wrpo-kernels', wrpo_kernels.__version__, '| torch', torch.__version__)"
