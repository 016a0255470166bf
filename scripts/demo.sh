#!/usr/bin/env bash
# First command of the README: set up, run two synthetic tiny-Llama tenants side by side
# (CPU here, no GPU needed), then analyse the run against a solo baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || . .venv/bin/activate
mt-run --config-name solo/tiny_llama
mt-run --config-name multitenant/pair_tiny
pair=$(ls -dt experiments/pair_tiny/*/ | head -1)
solo=$(ls -dt experiments/solo_tiny_llama/*/ | head -1)
if command -v mt-analyze >/dev/null 2>&1 && python -c "import multitenant.analysis.cli" 2>/dev/null; then
  mt-analyze "$pair" --baseline "$solo"
fi
echo "experiment folder: $pair"
