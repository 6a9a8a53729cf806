#!/usr/bin/env bash
# Create or reuse .venv and install megatron-mdm with what the examples and tests need.
# On a CPU machine torch 2.13.0 comes from the local wheel cache when one is configured; elsewhere pip
# resolves torch from the range in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.mdm-installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing megatron-mdm and its dependencies into .venv (first run only)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # Prefer the CPU build when no NVIDIA driver is present (avoids GBs of CUDA wheels).
    if command -v nvidia-smi >/dev/null 2>&1; then
      .venv/bin/python -m pip install -q "torch>=2.6,<2.14"
    else
      .venv/bin/python -m pip install -q "torch==2.13.0"
    fi
  fi
  .venv/bin/python -m pip install -q -e ".[dev,mpi,eval]"
  touch "$stamp"
fi
