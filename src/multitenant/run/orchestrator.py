"""Orchestrator: one experiment = one run dir, N tenant processes, one measured window.

Order of work (each step is undone in ``finally``, in reverse, whatever happens):
1. refuse an existing run (a ``manifest.json`` already there), write ``config.resolved.yaml``
   and ``manifest.json`` (status ``running``);
2. ``mps``: start a private control daemon (``mps_external``: check the given one answers);
3. start the telemetry sampler;
4. spawn every tenant as its own process (``tenants.spawn``), with its MPS share in its
   environment; under ``tenant_start: fork`` the process is forked from ``mt-run``'s tenant
   zygote (``zygote.py``; started on first use, it imports this job's engine modules first,
   outside any window: the previous job's tenants are gone by now). Tenants load side by side, except one whose engine sizes itself from the GPU's
   free memory (``Backend.loads_alone``: vLLM, a launched server): it starts once every tenant
   before it is ready, and the next one starts once it is ready (vLLM's memory profiling breaks
   when another process allocates meanwhile);
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
   cores and launched servers are in them), stop the sampler, stop the daemon, redact secrets
   from the tenants' logs, write the final manifest (``ok`` | ``failed`` | ``interrupted``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import selectors
import signal
import time
from pathlib import Path
from typing import Any

import yaml

from multitenant.config.validate import Experiment, Tenant
from multitenant.run import manifest as manifest_io
from multitenant.run.environment import cache_env, tenant_env
from multitenant.run.host import gpu_info, host_fingerprint
from multitenant.run.spec import TenantSpec, common_fields, type_path
from multitenant.run.tenants import (
    FAILED,
    FINISHED,
    READY,
    RUNNING,
    TenantProc,
    group_alive,
    last_line,
    signal_group,
    spawn,
)
from multitenant.schema import RunStatus, StopCmd, TenantStatus, WindowCmd, decode_message

log = logging.getLogger("multitenant")

POLL_S = 0.1
STOP_GRACE_S = 5.0  # after the stop command, before SIGTERM; then again before SIGKILL
# The device a tenant's engine uses: under MPS and timeslice its GPU is its device 0
# (run/mps/env.py says why), on the CPU the CPU.
GPU_TENANT_DEVICE = "cuda:0"

class Interrupted(Exception):
    """SIGTERM or SIGINT reached the orchestrator."""


class RunFailed(Exception):
    """The experiment cannot go on; the message is the manifest's reason."""


class Orchestrator:
    def __init__(self, experiment: Experiment, run_dir: Path, argv: list[str], overrides: list[str]) -> None:
        self.experiment = experiment
        self.config = experiment.config
        self.run_dir = run_dir
        self.argv = argv
        self.overrides = overrides
        self.mode = self.config.mode
        self.tenants: dict[str, TenantProc] = {}
        self.daemon: Any = None  # run.mps.MpsDaemon
        self.sampler: Any = None  # run.telemetry.TelemetrySampler
        self.selector = selectors.DefaultSelector()
        self.manifest = manifest_io.new_manifest(experiment, run_dir, argv, overrides, host_fingerprint())
        self.window: tuple[int, int | None] | None = None
        self.progress: Any = None  # run.progress.LiveProgress, set by the caller
        self._window_marked = False
        self.zygote: Any = None  # run.zygote.Zygote under tenant_start=fork

    def _save(self) -> None:
        manifest_io.save(self.manifest, self.run_dir)

    # -- main ------------------------------------------------------------------------------

    def run(self) -> str:
        """Run the experiment; returns the final status (ok | failed | interrupted)."""
        if (self.run_dir / manifest_io.MANIFEST_NAME).exists():
            raise RunFailed(f"{self.run_dir} already holds a run; never overwritten: choose another hydra.run.dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "config.resolved.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(dataclasses.asdict(self.config), f, sort_keys=False)
        self.manifest.gpu = gpu_info(self.experiment.device_index)
        self._save()
        status, reason = RunStatus.OK, None
        old_term = signal.signal(signal.SIGTERM, _raise_interrupted)
        try:
            self._start_mps()
            self._start_telemetry()
            self._start_tenants()
            self._verify_mps()
            self._announce_window()
            self._wait_all()
        except (Interrupted, KeyboardInterrupt) as e:
            status, reason = RunStatus.INTERRUPTED, f"interrupted by {'SIGINT' if isinstance(e, KeyboardInterrupt) else e}"
        except RunFailed as e:
            status, reason = RunStatus.FAILED, str(e)
        except Exception as e:  # a bug in the harness must still clean up and say so
            log.exception("harness error")
            status, reason = RunStatus.FAILED, f"harness error: {type(e).__name__}: {e}"
        finally:
            # Cleanup must finish even if a second Ctrl-C arrives.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                self._cleanup()
                # The first failing tenant is the cause; the MPS log line only shows that MPS
                # propagated a fault to the other clients (it can name the wrong client PID).
                mps_reason = self._mps_fault_reason() if status == RunStatus.FAILED else None
                if mps_reason:
                    reason = f"{reason}; MPS log: {mps_reason}"
                self._fill_gpu_sm_count()
                self.manifest.status = status
                self.manifest.reason = reason
                self.manifest.ended_wall = manifest_io.now_wall()
                self.manifest.ended_ns = time.monotonic_ns()
                self._save()
            finally:
                signal.signal(signal.SIGTERM, old_term)
                signal.signal(signal.SIGINT, old_int)
        return status

    # -- MPS and telemetry -----------------------------------------------------------------

    def _start_mps(self) -> None:
        if not self.experiment.applies_shares:
            return
        from multitenant.run import mps

        m = self.config.mps
        try:
            if self.mode == "mps":
                gpu = self.experiment.device_index or 0
                pipe_dir = Path(m.pipe_dir) if m.pipe_dir else mps.default_pipe_dir(gpu, self.manifest.run_id)
                log_dir = Path(m.log_dir) if m.log_dir else self.run_dir / "mps_log"
                self.daemon = mps.start_daemon(pipe_dir, log_dir, gpu, timeout_s=m.start_timeout_s)
            else:
                self.daemon = mps.external_daemon(m.pipe_dir, m.log_dir)
        except mps.MpsError as e:
            raise RunFailed(str(e)) from None
        self.manifest.mps = mps.manifest_block(self.daemon)
        self._save()

    def _verify_mps(self) -> None:
        if self.daemon is None:
            return
        from multitenant.run import mps

        pids = {name: tp.popen.pid for name, tp in self.tenants.items()}
        try:
            clients = mps.attached_pids(self.daemon, pids)
        except mps.MpsError as e:
            raise RunFailed(str(e)) from None
        for name, client_pids in clients.items():
            self.manifest.tenants[name].mps_attached = bool(client_pids)
            self.manifest.tenants[name].mps_client_pids = client_pids
        self.manifest.mps = mps.manifest_block(self.daemon)
        self._save()
        missing = [name for name, client_pids in clients.items() if not client_pids]
        if missing:
            raise RunFailed(mps.unattached_message(missing, self.daemon))

    def _fill_gpu_sm_count(self) -> None:
        """NVML has no SM-count query on this class of GPU: take it from a tenant that saw the
        whole GPU (no MPS cap), as reported by torch in its ``ready`` message."""
        gpu = self.manifest.gpu
        if gpu is None or gpu.sm_count:
            return
        for name, record in self.manifest.tenants.items():
            pct = self.experiment.tenants[name].config.share.active_thread_pct if record.share_applied else None
            if record.effective_sms and pct in (None, 100):
                gpu.sm_count = record.effective_sms
                gpu.sm_count_source = f"torch multi_processor_count reported by tenant {name}"
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
            self.experiment.device_index,
            self.config.telemetry_interval_ms,
            lambda: {n: tp.popen.pid for n, tp in self.tenants.items() if tp.exit_code is None},
        )
        self.sampler.start()

    # -- tenants ---------------------------------------------------------------------------

    def _start_tenants(self) -> None:
        """Spawn the tenants and wait until all are ready; those that load alone one at a time."""
        if self.config.tenant_start == "fork":
            self._start_zygote()
        for tenant in self.experiment.tenants.values():
            if tenant.loads_alone:
                self._wait_ready()  # every tenant started so far
            self._spawn(tenant)
            if tenant.loads_alone:
                self._wait_ready()
        self._wait_ready()

    def _start_zygote(self) -> None:
        """The tenant zygote, with this job's engine modules imported (vLLM only if a tenant
        uses it). A zygote that cannot start or import leaves the tenants to start fresh."""
        from multitenant.run import zygote

        modules = {zygote.TENANT_MODULE} | {t.backend.engine.partition(":")[0] for t in self.experiment.tenants.values()}
        try:
            z = zygote.shared(cache_env(os.environ, self.experiment.cache_dir))
            self.manifest.zygote_preload_s = z.preload(modules, timeout_s=self.config.ready_timeout_s)
        except (zygote.ZygoteError, OSError) as e:
            log.warning("tenant zygote unavailable (%s): tenants start fresh", e)
            return
        self.zygote = z

    def _spawn(self, tenant: Tenant) -> None:
        tdir = self.run_dir / "tenants" / tenant.name
        tdir.mkdir(parents=True, exist_ok=True)
        options_type = tenant.backend.options
        spec = TenantSpec(
            name=tenant.name,
            tenant=common_fields(tenant.config),
            engine=tenant.backend.engine,
            options_type=type_path(options_type) if options_type is not None else None,
            options=dataclasses.asdict(tenant.options) if tenant.options is not None else None,
            events_path=str(tdir / "events.jsonl"),
            engine_device="cpu" if self.mode == "cpu" else GPU_TENANT_DEVICE,
            mode=self.mode,
            max_input_len=tenant.max_input_len,
            max_output_len=tenant.max_output_len,
            pinned_mem_limit_bytes=tenant.pinned_mem_limit_bytes,
            gpu_total_memory_bytes=self.manifest.gpu.memory_total_bytes if self.manifest.gpu else None,
            # Tenants that load one after another wait longer for the window.
            window_timeout_s=self.config.ready_timeout_s * len(self.experiment.tenants) + 60,
        )
        pipe, logs = (self.daemon.pipe_dir, self.daemon.log_dir) if self.daemon is not None else (None, None)
        env = tenant_env(tenant, self.mode, self.experiment.cache_dir, pipe, logs)
        tp = spawn(spec, tenant, tdir, env, self.zygote)
        self.tenants[tenant.name] = tp
        self.selector.register(tp.msg_fd, selectors.EVENT_READ, tp)
        self.manifest.tenants[tenant.name].pid = tp.popen.pid
        self.manifest.tenants[tenant.name].start = tp.start
        log.info(
            "tenant %s started (%s), pid %d%s", tenant.name, tp.start, tp.popen.pid, " (loads alone)" if tenant.loads_alone else ""
        )
        self._save()

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
            for line in tp.take(chunk):
                msg = decode_message(line)
                tp.on_message(msg)
                if tp.ready is msg:
                    self._record_ready(tp)
        for tp in self.tenants.values():
            if tp.exit_code is None and (rc := tp.popen.poll()) is not None:
                tp.exit_code = rc
                self.manifest.tenants[tp.name].exit_code = rc
                if tp.state != FAILED:
                    tp.state = FAILED if rc != 0 else FINISHED
        if self.progress is not None:
            self.progress.update(self)

    def _record_ready(self, tp: TenantProc) -> None:
        msg = tp.ready
        assert msg is not None
        record = self.manifest.tenants[tp.name]
        record.load_s, record.warmup_s, record.effective_sms = msg.load_s, msg.warmup_s, msg.sms
        record.child_pids, record.engine = msg.child_pids, msg.engine
        record.import_s = msg.import_s
        log.info("tenant %s ready (load %.1fs, warm-up %.1fs)", tp.name, msg.load_s, msg.warmup_s)

    def _first_failure(self) -> str | None:
        failed = [tp for tp in self.tenants.values() if tp.state == FAILED or (tp.exit_code not in (None, 0))]
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
            share = tp.tenant.config.share
            limit_cause = mps.pinned_limit_cause(tp.name, share, why + "\n" + last_line(tp.stderr_path))
            if limit_cause:
                reason = f"{limit_cause} ({code}): {why}"
        return reason

    def _wait_ready(self) -> None:
        """Until every tenant started so far is ready; each has ``ready_timeout_s`` from its start."""
        timeout_s = self.config.ready_timeout_s
        while not all(tp.state == READY for tp in self.tenants.values()):
            self._pump(POLL_S)
            if (why := self._first_failure()) is not None:
                raise RunFailed(why)
            exited = [tp for tp in self.tenants.values() if tp.exit_code is not None]
            if exited:
                raise RunFailed(f"tenant {exited[0].name} exited before it was ready: {last_line(exited[0].stderr_path)}")
            now = time.monotonic()
            late = [tp.name for tp in self.tenants.values() if tp.state != READY and now - tp.started_at > timeout_s]
            if late:
                raise RunFailed(
                    f"tenant(s) {', '.join(late)} not ready after ready_timeout_s={timeout_s}; "
                    "raise ready_timeout_s or look at their stderr.log"
                )

    def _announce_window(self) -> None:
        t0 = time.monotonic_ns() + int(self.config.window_lead_s * 1e9)
        ends: list[int | None] = []
        for tp in self.tenants.values():
            start, end = tp.announce(t0)
            ends.append(end)
            tp.send(WindowCmd(t0=start, t1=end))
            tp.state = RUNNING
        t1 = None if any(e is None for e in ends) else min(e for e in ends if e is not None)
        self.window = (t0, t1)
        self.manifest.window.t0_ns, self.manifest.window.t1_ns = t0, t1
        self._save()

    def _wait_all(self) -> None:
        deadline_ns: int | None = None
        windows = [tp.window for tp in self.tenants.values()]
        if all(w is not None and w[1] is not None for w in windows):
            last_end = max(w[1] for w in windows if w is not None and w[1] is not None)
            deadline_ns = last_end + int(self.config.stop_timeout_s * 1e9)
        while any(tp.exit_code is None for tp in self.tenants.values()):
            self._pump(POLL_S)
            self._track_window()
            if (why := self._first_failure()) is not None:
                raise RunFailed(why)
            if (why := self._kill_hung_tenant()) is not None:
                raise RunFailed(why)
            if deadline_ns is not None and time.monotonic_ns() > deadline_ns:
                late = [tp.name for tp in self.tenants.values() if tp.exit_code is None]
                raise RunFailed(f"tenant(s) {', '.join(late)} did not finish within stop_timeout_s after their window")
        self._pump(0)  # last messages
        self._track_window(ended=True)
        if (why := self._first_failure()) is not None:
            raise RunFailed(why)
        not_ok = [tp for tp in self.tenants.values() if tp.final_status not in (TenantStatus.OK, None)]
        if not_ok:
            raise RunFailed(f"tenant(s) {', '.join(tp.name for tp in not_ok)} ended with status {not_ok[0].final_status}")

    def _track_window(self, ended: bool = False) -> None:
        """Mark the window's start and end on the telemetry sampler (to a poll's precision,
        0.1 s) and record what the host and GPU did in between (``manifest.activity``): steal and
        iowait, each tenant's CPU seconds, the GPU's clock range. A window that stops on request
        counts ends when the tenants have finished."""
        if self.window is None or self.sampler is None:
            return
        now = time.monotonic_ns()
        t0, t1 = self.window
        if not self._window_marked and now >= t0:
            self.sampler.mark_window()
            self._window_marked = True
        if self._window_marked and self.manifest.activity is None and (ended or (t1 is not None and now >= t1)):
            self.manifest.activity = self.sampler.window_activity()
            self._save()

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
        limit_s = self.config.hang_timeout_s
        now = time.monotonic_ns()
        for tp in self.tenants.values():
            if tp.exit_code is not None or tp.window is None:
                continue
            silent_ns = now - max(tp.last_msg_ns, tp.window[0])
            if silent_ns > int(limit_s * 1e9):
                signal_group(tp, signal.SIGKILL)
                tp.state = FAILED
                return (
                    f"tenant {tp.name} hung: nothing from it for {silent_ns / 1e9:.1f} s in its measured phase "
                    f"(hang_timeout_s={limit_s:g}), killed with SIGKILL; raise hang_timeout_s "
                    f"if its steps are that slow (last stderr line: {last_line(tp.stderr_path) or 'none'})"
                )
        return None

    # -- cleanup ---------------------------------------------------------------------------

    def _cleanup(self) -> None:
        alive = [tp for tp in self.tenants.values() if tp.popen.poll() is None]
        for tp in alive:
            tp.send(StopCmd())
        self._wait_exit(alive, STOP_GRACE_S)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for tp in self.tenants.values():
                signal_group(tp, sig)
            self._wait_exit(list(self.tenants.values()), STOP_GRACE_S if sig == signal.SIGTERM else 10.0)
        for tp in self.tenants.values():
            if tp.exit_code is None:
                tp.exit_code = tp.popen.poll()
                self.manifest.tenants[tp.name].exit_code = tp.exit_code
            with contextlib.suppress(OSError):
                tp.cmd_pipe.close()  # type: ignore[attr-defined]
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
        if self.daemon is None:
            return
        from multitenant.run import mps

        result = mps.stop_daemon(self.daemon, timeout_s=self.config.mps.stop_timeout_s)
        self.manifest.mps = mps.manifest_block(self.daemon, result)
        if not result.clean:
            log.error("MPS daemon on %s not fully stopped: pids %s left", self.daemon.pipe_dir, result.left_pids)
        elif signalled := [a for a in result.actions if a.startswith(("SIGTERM", "SIGKILL"))]:
            # A daemon that ignores quit often sits on a faulted GPU context: say so, not only
            # in the manifest.
            log.warning("MPS daemon on %s did not quit; stopped with %s", self.daemon.pipe_dir, ", ".join(signalled))

    def _redact_secrets(self) -> None:
        """Secrets (API keys) never stay in a file of the run: a server may print its arguments."""
        names = {name for t in self.experiment.tenants.values() for name in t.backend.secret_env(t.options)}
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
            if all(tp.popen.poll() is not None and not group_alive(tp.popen.pid) for tp in tenants):
                return
            self._pump(POLL_S) if self.selector.get_map() else time.sleep(POLL_S)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)
