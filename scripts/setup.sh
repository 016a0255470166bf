#!/usr/bin/env bash
# Set up multitenant in ./.venv (or the active virtual environment / conda env).
#   bash scripts/setup.sh            # runtime + model side + test tools
# On a rented GPU box whose python already has a CUDA torch, that torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  # No torch yet: a CPU machine gets the small CPU build; a GPU machine pip's default CUDA build.
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.4"
  else
    python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.4"
  fi
fi
python -m pip install -q -e ".[models,dev]"
echo "multitenant is installed in $(python -c 'import sys; print(sys.prefix)')"
