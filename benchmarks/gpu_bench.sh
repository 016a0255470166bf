#!/usr/bin/env bash
# Every GPU benchmark of the hf backend and its GPU tests, in one go (one device call):
#   decode_efficiency.py (generate vs eager vs graphs, roofline), tests/gpu/test_graphs.py,
#   logging_overhead.py (events on/off), mps_overhead.py (no MPS vs MPS 100/50/25 %).
# Usage, from the repository root:  OUT=/tmp/bench bash benchmarks/gpu_bench.sh
# Results: $OUT/{gpu_bench.log,decode_efficiency.json,logging_overhead.json,mps_overhead.json}.
# Each part has its own time limit (T_* below, seconds) so one slow part cannot starve the rest;
# the MPS daemon that mps_overhead.py starts is stopped on every exit path (and here once more).
# Python packages missing on the machine (orjson for the event writer) are installed from
# wheels in .whl/ when there are any (see the device notes in benchmarks/RESULTS.md).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
LOG=$OUT/gpu_bench.log
: > "$LOG"
# Seen on an H100 (2026-11-22): decode 198 s, tests 62 s, logging 36 s, MPS ~37 s per tenant process.
T_DECODE=${T_DECODE:-220}
T_TEST=${T_TEST:-80}
T_LOGGING=${T_LOGGING:-50}
T_MPS=${T_MPS:-180}
DECODE_ARGS=${DECODE_ARGS:-}
PARTS=${PARTS:-decode_efficiency test_graphs logging_overhead mps_overhead}  # a subset runs fewer
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null && ! python3 -c "import orjson" 2> /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
MPS_PIPE=/tmp/mtb-mps-$$
cleanup() {
  if [ -S "$MPS_PIPE/control" ]; then echo quit | CUDA_MPS_PIPE_DIRECTORY=$MPS_PIPE nvidia-cuda-mps-control; fi
}
trap cleanup EXIT

part() {  # part NAME LIMIT_S COMMAND...: run with a time limit, log it, note its exit code
  local name=$1 limit=$2
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name (limit ${limit}s) $(date +%T)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "=== $name exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$LOG"
}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,compute_mode,persistence_mode,mig.mode.current --format=csv
  python3 -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)"
  nproc
} 2>&1 | tee -a "$LOG"

part decode_efficiency "$T_DECODE" python3 benchmarks/decode_efficiency.py \
  --time-budget-s $((T_DECODE - 50)) --out "$OUT/decode_efficiency.json" $DECODE_ARGS
part test_graphs "$T_TEST" python3 -m pytest -v -p no:cacheprovider tests/gpu/test_graphs.py
part logging_overhead "$T_LOGGING" python3 benchmarks/logging_overhead.py --out "$OUT/logging_overhead.json"
part mps_overhead "$T_MPS" python3 benchmarks/mps_overhead.py --pipe-dir "$MPS_PIPE" \
  --child-timeout-s $((T_MPS / 3)) --out "$OUT/mps_overhead.json"
echo "=== done $(date +%T)" | tee -a "$LOG"
