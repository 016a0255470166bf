#!/usr/bin/env bash
# Probe the real CUDA MPS on a GPU machine, then run the MPS/telemetry checks there.
#
#   OUT=/some/dir scripts/gpu_mps_probe.sh [all|tests] 2>&1 | tee /some/dir/probe.log
#
# ("tests" skips part 1.)
# Part 1 talks to nvidia-cuda-mps-control directly (no harness code): what it prints with no
# daemon, the pipe directory, get_server_list / get_client_list / ps / help output, the SM
# count clients see at 100/50/25 %, terminate_client, a pinned-memory limit, quit while clients
# are attached, a client fault (illegal address) next to a healthy client, a killed daemon's
# stale socket, and the MPS logs. Part 2 runs tests/gpu/test_mps.py, the unit tests (with the
# test double) and benchmarks/telemetry_overhead.py. Everything it starts, it stops; the last
# lines list any MPS process still alive. It never changes compute mode, clocks, MIG or
# persistence, and uses no sudo. Besides stdout it writes $OUT/pytest.log, $OUT/evidence.tgz
# and $OUT/telemetry_overhead.json.
set -u
OUT=${OUT:-/tmp/mt-probe-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
W=/tmp/mtp; rm -rf "$W"; mkdir -p "$W"
T0=$(date +%s%N)
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
step() { printf '\n===== [%6d ms] %s\n' "$(ms_since "$T0")" "$*"; }
# ctl PIPE_DIR COMMAND: one command through the real binary, bounded, with its exit code.
ctl() {
  local s rc
  s=$(date +%s%N)
  echo "$2" | CUDA_MPS_PIPE_DIRECTORY="$1" timeout 15 nvidia-cuda-mps-control
  rc=$?
  printf '[%s -> rc=%s in %s ms]\n' "$2" "$rc" "$(ms_since "$s")"
}
mpsps() { ps -eo pid,ppid,user,etimes,args | grep -E 'nvidia-cuda-mps|mtp_client' | grep -v grep || echo "(no MPS process)"; }

cat > "$W/client.py" <<'EOF'
# mtp_client: open a CUDA context, report, optionally allocate / fault / loop, hold HOLD_S seconds.
import json, os, sys, time, traceback
import torch
r = {"pid": os.getpid(), "env": {k: v for k, v in os.environ.items() if k.startswith("CUDA_")}}
try:
    x = torch.ones(1 << 20, device="cuda"); torch.cuda.synchronize()
    p = torch.cuda.get_device_properties(0)
    r.update(sms=p.multi_processor_count, name=p.name, devices=torch.cuda.device_count())
    want = int(os.environ.get("ALLOC_BYTES", "0"))
    if want:
        try:
            y = torch.empty(want, dtype=torch.uint8, device="cuda"); y.fill_(1); torch.cuda.synchronize()
            r["alloc"] = "ok"
        except Exception as e:
            r["alloc"] = f"{type(e).__name__}: {e}"
    print("READY " + json.dumps(r), flush=True)
    loop_s = float(os.environ.get("LOOP_S", "0"))
    if loop_s:
        a = torch.randn(4096, 4096, device="cuda"); n = 0; t = time.time()
        while time.time() - t < loop_s:
            a = torch.tanh(a @ a); torch.cuda.synchronize(); n += 1
        print(f"LOOP done {n} iters", flush=True)
    time.sleep(float(os.environ.get("HOLD_S", "0")))
    print("EXIT ok", flush=True)
except Exception:
    print("EXCEPTION " + traceback.format_exc().replace("\n", " | "), flush=True)
    sys.exit(3)
EOF
cat > "$W/fault.py" <<'EOF'
# mtp_client fault: an illegal-address kernel (CuPy), under MPS next to a healthy client.
import os, time, traceback
try:
    import cupy as cp
    k = cp.RawKernel(r'extern "C" __global__ void k() { *((volatile int*)0x10) = 1; }', "k")
    cp.zeros(1).sum()
    print("FAULT launching", os.getpid(), flush=True)
    k((1,), (1,), ()); cp.cuda.runtime.deviceSynchronize()
    print("FAULT no error?!", flush=True)
except Exception:
    print("FAULT exception " + traceback.format_exc().replace("\n", " | "), flush=True)
EOF
ready() { # ready FILE...: wait (max 90 s) until each file holds a READY or EXCEPTION line
  local t=0
  for f in "$@"; do
    while ! grep -qE '^(READY|EXCEPTION)' "$f" 2>/dev/null && [ $t -lt 900 ]; do sleep 0.1; t=$((t+1)); done
  done
}
pid_of() { sed -n 's/^READY {"pid": \([0-9]*\).*/\1/p' "$1"; }

if [ "${1:-all}" = all ]; then
step "machine"
date -u; uname -r; id
nvidia-smi --query-gpu=index,name,uuid,driver_version,compute_mode,persistence_mode,mig.mode.current,memory.total --format=csv
nvidia-smi | head -5
command -v nvidia-cuda-mps-control nvidia-cuda-mps-server || echo "MPS binaries not on PATH"
ls -la "$(dirname "$(command -v nvidia-cuda-mps-control 2>/dev/null || echo /x/x)")" 2>/dev/null | grep -i mps
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.version.cuda)"
mpsps

step "no daemon: pipe dir missing, then empty"
ctl "$W/none" get_server_list
mkdir -p "$W/empty"; ctl "$W/empty" get_server_list

P=$W/p1; L=$W/l1; mkdir -p "$P" "$L"
step "start: nvidia-cuda-mps-control -d (CUDA_VISIBLE_DEVICES=0)"
s=$(date +%s%N)
CUDA_VISIBLE_DEVICES=0 CUDA_MPS_PIPE_DIRECTORY=$P CUDA_MPS_LOG_DIRECTORY=$L nvidia-cuda-mps-control -d
echo "[-d rc=$? in $(ms_since "$s") ms]"
ls -la "$P"; sleep 0.3; ls -la "$P"; echo "pid file:"; cat "$P"/*.pid 2>/dev/null; echo; mpsps
step "second -d on the same pipe dir"
CUDA_VISIBLE_DEVICES=0 CUDA_MPS_PIPE_DIRECTORY=$P CUDA_MPS_LOG_DIRECTORY=$L timeout 15 nvidia-cuda-mps-control -d; echo "[rc=$?]"; mpsps
step "commands before any client"
ctl "$P" help
ctl "$P" get_server_list
ctl "$P" get_default_active_thread_percentage
ctl "$P" ps
ctl "$P" "get_client_list 1"
ctl "$P" bogus_command

step "three clients (100/50/25 %) + a pinned-limit client (0=1G, allocating 2 GiB)"
C="CUDA_MPS_PIPE_DIRECTORY=$P CUDA_MPS_LOG_DIRECTORY=$L"
env -u CUDA_VISIBLE_DEVICES CUDA_MPS_PIPE_DIRECTORY=$P CUDA_MPS_LOG_DIRECTORY=$L HOLD_S=45 $PY "$W/client.py" > "$W/c100" 2>&1 &
env -u CUDA_VISIBLE_DEVICES CUDA_MPS_PIPE_DIRECTORY=$P CUDA_MPS_LOG_DIRECTORY=$L HOLD_S=45 CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 $PY "$W/client.py" > "$W/c50" 2>&1 &
env -u CUDA_VISIBLE_DEVICES CUDA_MPS_PIPE_DIRECTORY=$P CUDA_MPS_LOG_DIRECTORY=$L HOLD_S=45 CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=25 $PY "$W/client.py" > "$W/c25" 2>&1 &
env -u CUDA_VISIBLE_DEVICES CUDA_MPS_PIPE_DIRECTORY=$P CUDA_MPS_LOG_DIRECTORY=$L CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=1G ALLOC_BYTES=$((2<<30)) $PY "$W/client.py" > "$W/cpin" 2>&1 &
env -u CUDA_VISIBLE_DEVICES CUDA_MPS_PIPE_DIRECTORY=$P CUDA_MPS_LOG_DIRECTORY=$L CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=1G ALLOC_BYTES=$((256<<20)) $PY "$W/client.py" > "$W/cpin_ok" 2>&1 &
CUDA_VISIBLE_DEVICES=0 CUDA_MPS_PIPE_DIRECTORY=$W/no-daemon-here $PY "$W/client.py" > "$W/cnomps" 2>&1 &
ready "$W/c100" "$W/c50" "$W/c25" "$W/cpin" "$W/cpin_ok" "$W/cnomps"
for f in c100 c50 c25 cpin cpin_ok cnomps; do echo "$f: $(cat "$W/$f" | head -3)"; done
ctl "$P" get_server_list
S=$(echo get_server_list | CUDA_MPS_PIPE_DIRECTORY=$P timeout 15 nvidia-cuda-mps-control | head -1 | tr -d ' \r')
echo "server pid: $S"
ctl "$P" "get_client_list $S"
ctl "$P" ps
ctl "$P" "get_device_client_list $S"
ctl "$P" "get_server_status $S"
echo "nomps client pid (must not be listed): $(pid_of "$W/cnomps")"
nvidia-smi
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
$PY - <<'EOF'
import pynvml as n
n.nvmlInit(); h = n.nvmlDeviceGetHandleByIndex(0)
for f in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetMPSComputeRunningProcesses"):
    try: print(f, [(p.pid, p.usedGpuMemory) for p in getattr(n, f)(h)])
    except Exception as e: print(f, "ERROR", type(e).__name__, e)
try:
    a = n.nvmlDeviceGetAttributes(h); print("attributes.multiprocessorCount", a.multiprocessorCount)
except Exception as e: print("nvmlDeviceGetAttributes ERROR", type(e).__name__, e)
print("compute mode", n.nvmlDeviceGetComputeMode(h), "persistence", n.nvmlDeviceGetPersistenceMode(h))
try: print("mig", n.nvmlDeviceGetMigMode(h))
except Exception as e: print("mig ERROR", e)
print("cuda driver", n.nvmlSystemGetCudaDriverVersion_v2(), "driver", n.nvmlSystemGetDriverVersion())
EOF

step "terminate_client <server> <25% client>"
Q=$(pid_of "$W/c25"); echo "client $Q"
ctl "$P" "terminate_client $S $Q"
sleep 3; echo "c25 after terminate: alive=$(kill -0 "$Q" 2>/dev/null && echo yes || echo no)"; cat "$W/c25"
ctl "$P" "get_client_list $S"
ctl "$P" "terminate_client $S 999999"

step "quit while two clients (100 %, 50 %) are attached"
ctl "$P" quit
for i in 1 2 3 4 5 6; do sleep 1; echo "t+${i}s:"; mpsps; done
ctl "$P" get_server_list
echo "killing the two clients"; kill "$(pid_of "$W/c100")" "$(pid_of "$W/c50")" 2>/dev/null
for i in 1 2 3 4 5; do sleep 1; echo "t+${i}s after client kill:"; mpsps; done
ls -la "$P"

step "logs of daemon 1"
echo "--- control.log"; cat "$L/control.log"; echo "--- server.log"; cat "$L"/server.log "$L"/*/server.log 2>/dev/null

step "client fault next to a healthy client"
P2=$W/p2; L2=$W/l2; mkdir -p "$P2" "$L2"
CUDA_VISIBLE_DEVICES=0 CUDA_MPS_PIPE_DIRECTORY=$P2 CUDA_MPS_LOG_DIRECTORY=$L2 nvidia-cuda-mps-control -d; sleep 0.5
env -u CUDA_VISIBLE_DEVICES CUDA_MPS_PIPE_DIRECTORY=$P2 CUDA_MPS_LOG_DIRECTORY=$L2 LOOP_S=12 $PY "$W/client.py" > "$W/healthy" 2>&1 &
HP=$!
ready "$W/healthy"; cat "$W/healthy"
env -u CUDA_VISIBLE_DEVICES CUDA_MPS_PIPE_DIRECTORY=$P2 CUDA_MPS_LOG_DIRECTORY=$L2 timeout 60 $PY "$W/fault.py" > "$W/fault" 2>&1
echo "fault client rc=$?"; cat "$W/fault"
ctl "$P2" get_server_list
S2=$(echo get_server_list | CUDA_MPS_PIPE_DIRECTORY=$P2 timeout 15 nvidia-cuda-mps-control | head -1 | tr -d ' \r')
ctl "$P2" "get_client_list $S2"
timeout 40 tail --pid=$HP -f /dev/null; kill -9 $HP 2>/dev/null; wait $HP; echo "healthy client exit: $?"; cat "$W/healthy"
echo "a new client after the fault:"
env -u CUDA_VISIBLE_DEVICES CUDA_MPS_PIPE_DIRECTORY=$P2 CUDA_MPS_LOG_DIRECTORY=$L2 timeout 60 $PY "$W/client.py" 2>&1 | tail -3
ctl "$P2" quit; sleep 2; mpsps
echo "--- control.log (2)"; cat "$L2/control.log"; echo "--- server.log (2)"; cat "$L2"/server.log 2>/dev/null

step "stale socket: SIGKILL the daemon, then ask"
P3=$W/p3; mkdir -p "$P3"
CUDA_VISIBLE_DEVICES=0 CUDA_MPS_PIPE_DIRECTORY=$P3 CUDA_MPS_LOG_DIRECTORY=$P3 nvidia-cuda-mps-control -d; sleep 0.5
kill -9 "$(cat "$P3/nvidia-cuda-mps-control.pid")"; sleep 0.3; ls -la "$P3"
ctl "$P3" get_server_list
echo "restart on the stale dir:"; CUDA_VISIBLE_DEVICES=0 CUDA_MPS_PIPE_DIRECTORY=$P3 CUDA_MPS_LOG_DIRECTORY=$P3 timeout 15 nvidia-cuda-mps-control -d; echo "[rc=$?]"; sleep 0.5
ctl "$P3" get_server_list; ctl "$P3" quit; sleep 1
tail -5 "$P3/control.log"

step "after part 1 (any MPS process of part 1 still alive is listed, then SIGKILLed by PID)"
mpsps
for pid in $(pgrep -f nvidia-cuda-mps); do
  if tr '\0' '\n' < /proc/$pid/environ 2>/dev/null | grep -q "^CUDA_MPS_PIPE_DIRECTORY=$W/"; then echo "left over: $pid"; kill -9 "$pid"; fi
done

fi  # part 1

step "part 2: tests/gpu/test_mps.py tests/gpu/test_telemetry_gpu.py"
if [ -d .whl ]; then $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"; fi
mkdir -p "$W/evidence"
MT_GPU_EVIDENCE_DIR=$W/evidence timeout 300 $PY -m pytest tests/gpu/test_mps.py tests/gpu/test_telemetry_gpu.py -v -s -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/pytest.log" | grep -E "EVIDENCE|PASS|FAIL|ERROR|passed|failed|skipped|Error" | cut -c1-1500
step "benchmarks/telemetry_overhead.py"
timeout 150 $PY benchmarks/telemetry_overhead.py --out "$OUT/telemetry_overhead.json" --run-s 2 --lead-s 10
step "unit tests (test double) on this machine"
timeout 90 $PY -m pytest tests/unit/test_mps.py tests/unit/test_telemetry.py tests/unit/test_host.py -q -p no:cacheprovider -o addopts="" 2>&1 | tail -5 | tee -a "$OUT/pytest.log"
tar czf "$OUT/evidence.tgz" -C "$W" evidence
step "final: MPS processes still alive"
mpsps
