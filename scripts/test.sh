#!/usr/bin/env bash
# Second command of the README: lint, type-check and run the test suite.
# GPU tests (tests/gpu) skip themselves without a GPU. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || { [ -f .venv/bin/activate ] && . .venv/bin/activate; }
set -e
ruff check src tests benchmarks scripts
mypy
set +e
python -m pytest tests -ra "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a broken test tree, not a pass" >&2
  exit 1
fi
exit "$rc"
