#!/usr/bin/env bash
# End-to-end evidence on a GPU machine: real mt-run, real MPS, real tenants.
#
#   OUT=/tmp/out bash scripts/gpu_validation.sh spine    # eager Llama-1B pair, timeslice
#   OUT=/tmp/out bash scripts/gpu_validation.sh solo     # solo graphs tenant: timeslice, MPS 100/50/25 %
#   OUT=/tmp/out bash scripts/gpu_validation.sh pair     # pair sweep 100/100,50/50,70/30 (Hydra multirun),
#                                                        # the pair in timeslice, a tenant killed mid-window
#   OUT=/tmp/out bash scripts/gpu_validation.sh vllm     # solo vLLM, the vLLM pair in timeslice,
#                                                        # MPS 100/100 and a 70/30,50/50 split sweep
#   OUT=/tmp/out bash scripts/gpu_validation.sh openai   # `vllm serve` tenants: solo, the pair under MPS;
#                                                        # then benchmarks/vllm_overhead.py
#   OUT=/tmp/out bash scripts/gpu_validation.sh hf_vllm  # solo/llama1b, then hf_vs_vllm under MPS
#   OUT=/tmp/out bash scripts/gpu_validation.sh sweep    # prime the cache, then the cost
#                                                        # of a 5-point split sweep, 30 s windows
#   OUT=/tmp/out bash scripts/gpu_validation.sh trials   # solo + 5-point split sweep, trials=3
#                                                        # (trials_solo, trials_sweep: one of them)
# vLLM phases need vLLM importable: VLLM_WHEELS=DIR holding the joined vllm wheel and deps/ (see
# ../shared/gpu/pack_vllm_wheels.sh) installs it into /tmp/vsite first.
# After every run it lists any tenant, MPS daemon or GPU compute process still alive (there must
# be none), then prints a table (scripts/validation_table.py) and packs the experiment folders
# into $OUT/exp_<phase>.tgz for mt-analyze. Never changes compute mode, clocks, MIG, persistence.
set -u
PHASE=${1:?phase: spine|solo|pair}
OUT=${OUT:-/tmp/mt-validation-out}
DUR=${DUR:-10}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if ! python3 -c "import hydra, orjson" 2>/dev/null; then
  # The GPU image has no hydra-core/orjson and no network: wheels carried in .whl/.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -n "${VLLM_WHEELS:-}" ] && ! PYTHONPATH=/tmp/vsite python3 -c "import vllm" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/vsite \
    "$VLLM_WHEELS"/vllm-*.whl "$VLLM_WHEELS"/deps/*.whl || exit 1
fi
[ -d /tmp/vsite ] && export PYTHONPATH=/tmp/site:/tmp/vsite PATH="/tmp/vsite/bin:$PATH"
export VLLM_USE_FLASHINFER_SAMPLER=0
export PYTHONPATH="$PWD/src:$PYTHONPATH" PYTHONUNBUFFERED=1 MT_CONFIG_DIR="$PWD/configs"
EXP=/tmp/mt-exp/$PHASE
rm -rf "$EXP"; mkdir -p "$EXP"
LOG="$OUT/leftovers_$PHASE.txt"; : > "$LOG"
nvidia-smi --query-gpu=name,uuid,driver_version,compute_mode,mig.mode.current,persistence_mode,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu_$PHASE.csv"

leftovers() {  # what survived run $1: must be nothing
  local tenants mps apps
  # Zombies do not count: on the lent VM, PID 1 does not reap the MPS daemon's intermediate fork.
  # Tenants, their vLLM engine cores and workers, launched servers.
  tenants=$(ps -eo pid=,stat=,args= | awk '$2 !~ /^Z/' | grep -E "multitenant.run.tenant|VLLM::|vllm serve|api_server" | grep -v grep || true)
  mps=$(ps -eo pid=,stat=,args= | awk '$2 !~ /^Z/' | grep "nvidia-cuda-mps" | grep -v grep || true)
  apps=$(nvidia-smi --query-compute-apps=pid,process_name --format=csv,noheader 2>/dev/null || true)
  printf '%s\ttenants=[%s]\tmps=[%s]\tgpu_apps=[%s]\n' "$1" "$tenants" "$mps" "$apps" | tee -a "$LOG"
}
mtrun() {  # mtrun NAME ARGS...: one experiment into $EXP/NAME
  local name=$1; shift
  echo "===== $name: mt-run $*"
  local t=$SECONDS
  python3 -m multitenant.cli "$@" "hydra.run.dir=$EXP/$name" progress=false
  echo "rc=$? after $((SECONDS - t)) s"
  leftovers "$name"
}
short() {  # duration overrides for every tenant of a config
  for t in "$@"; do printf 'tenants.%s.workload.duration_s=%s ' "$t" "$DUR"; done
}

case "$PHASE" in
spine)
  mtrun pair_llama1b_eager_timeslice --config-name multitenant/pair_llama1b mode=timeslice \
    tenants.a.execution=eager tenants.b.execution=eager $(short a b)
  ;;
solo)
  S=llama1b_graphs
  mtrun solo_timeslice --config-name solo/llama1b $(short $S)
  for pct in 100 50 25; do
    mtrun "solo_mps_$pct" --config-name solo/llama1b mode=mps "tenants.$S.share.active_thread_pct=$pct" $(short $S)
  done
  ;;
pair)
  echo "===== sweep: mt-run -m split=100/100,50/50,70/30"
  t=$SECONDS
  python3 -m multitenant.cli -m --config-name multitenant/pair_llama1b 'split=100/100,50/50,70/30' \
    $(short a b) progress=false "hydra.sweep.dir=$EXP/sweep"
  echo "sweep rc=$? after $((SECONDS - t)) s"
  leftovers sweep
  mtrun pair_timeslice --config-name multitenant/pair_llama1b mode=timeslice $(short a b)
  # A tenant killed (SIGKILL) two seconds into the window: run must be `failed`, nothing left.
  echo "===== pair_killed: tenant b gets SIGKILL mid-window"
  python3 -m multitenant.cli --config-name multitenant/pair_llama1b split=50/50 $(short a b) progress=false \
    "hydra.run.dir=$EXP/pair_killed" &
  mt=$!
  python3 - "$EXP/pair_killed/manifest.json" <<'PY'
import json, os, signal, sys, time
path = sys.argv[1]
deadline = time.monotonic() + 240
while time.monotonic() < deadline:
    try:
        m = json.load(open(path))
    except (OSError, ValueError):
        time.sleep(0.2); continue
    t0 = m["window"]["t0_ns"]
    if t0 and time.monotonic_ns() > t0 + 2_000_000_000:
        pid = m["tenants"]["b"]["pid"]
        os.kill(pid, signal.SIGKILL)
        print(f"killed tenant b (pid {pid}) {(time.monotonic_ns() - t0) / 1e9:.1f} s into the window")
        break
    time.sleep(0.2)
else:
    print("window never opened")
PY
  wait $mt; echo "rc=$?"
  leftovers pair_killed
  ;;
vllm)
  mtrun solo_vllm --config-name solo/vllm_llama1b $(short vllm_llama1b)
  mtrun pair_vllm_timeslice --config-name multitenant/pair_vllm_llama1b mode=timeslice $(short a b)
  mtrun pair_vllm_mps --config-name multitenant/pair_vllm_llama1b $(short a b)
  echo "===== sweep: mt-run -m split=70/30,50/50"
  t=$SECONDS
  python3 -m multitenant.cli -m --config-name multitenant/pair_vllm_llama1b 'split=70/30,50/50' \
    $(short a b) progress=false "hydra.sweep.dir=$EXP/sweep"
  echo "sweep rc=$? after $((SECONDS - t)) s"
  leftovers sweep
  ;;
openai)
  mtrun solo_openai --config-name solo/openai_llama1b $(short openai_llama1b)
  mtrun pair_openai_mps --config-name multitenant/pair_openai_llama1b $(short a b)
  echo "===== benchmarks/vllm_overhead.py"
  python3 benchmarks/vllm_overhead.py --device cuda:0 --model synthetic:llama-3.2-1b --dtype bfloat16 \
    --execution graphs --batch 8 --input-len 512 --output-len 128 --requests 64 --rounds 3 \
    --gpu-memory-utilization 0.3 --kv-cache-memory-bytes 2147483648 --out "$OUT/vllm_overhead.json" \
    2>"$OUT/vllm_overhead.stderr" | tee "$OUT/vllm_overhead.txt"
  leftovers vllm_overhead
  ;;
hf_vllm)
  mtrun solo_hf --config-name solo/llama1b $(short llama1b_graphs)
  mtrun hf_vs_vllm --config-name multitenant/hf_vs_vllm $(short hf vllm)
  ;;
sweep)
  # Issue 10: a first run fills the compile cache (cache_dir, ~/.cache/multitenant), then the
  # cost of a 5-point split sweep with 30 s windows on that warm cache (benchmarks/sweep_cost.py).
  mtrun prime --config-name multitenant/pair_llama1b split=50/50 $(DUR=3 short a b)
  python3 benchmarks/sweep_cost.py --out "$OUT/sweep_cost.json" --sweep-dir "$EXP/cost" -- \
    --config-name multitenant/pair_llama1b 'split=90/10,70/30,50/50,30/70,10/90' $(DUR=30 short a b) \
    2>"$OUT/sweep_cost.stderr" | tee "$OUT/sweep_cost.md"
  leftovers cost
  ;;
trials|trials_solo|trials_sweep)
  # Issue 10: the solo baseline and the 5-point split sweep, three trials each (interleaved);
  # trials_solo / trials_sweep run one of the two (each fits one 10-minute call).
  for args in "solo --config-name solo/llama1b $(short llama1b_graphs)" \
              "sweep --config-name multitenant/pair_llama1b split=90/10,70/30,50/50,30/70,10/90 $(short a b)"; do
    set -- $args; name=$1; shift
    [ "$PHASE" = trials ] || [ "$PHASE" = "trials_$name" ] || continue
    echo "===== $name: mt-run $* trials=3"
    t=$SECONDS
    python3 -m multitenant.cli "$@" trials=3 progress=false "hydra.sweep.dir=$EXP/$name"
    echo "$name rc=$? after $((SECONDS - t)) s"
    leftovers "$name"
  done
  ;;
*) echo "unknown phase $PHASE"; exit 2 ;;
esac
python3 scripts/validation_table.py "$EXP" | tee "$OUT/table_$PHASE.md"
tar -C /tmp/mt-exp -czf "$OUT/exp_$PHASE.tgz" "$PHASE"
ls -la "$OUT"
