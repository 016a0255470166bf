"""Tenant process: one model, one request stream, one ``events.jsonl``.

Started by the orchestrator as its own OS process (never a thread, never a fork after CUDA
init: one CUDA context each)::

    python -m multitenant.run.tenant --spec tenants/<name>/spec.json --ctl-in FD --ctl-out FD

Lifecycle: ``run_start`` -> build the engine (the backend's factory named in the spec) and load
it -> warm up (compile/capture, then ``warmup_requests`` served closed-loop) -> ``ready`` (to the
log and to the orchestrator) -> wait for the window announcement -> ``window`` -> serve the
measured stream until its stop condition -> ``run_end``.

Control channel (JSON lines over two pipes, ``schema``'s message types): tenant -> orchestrator
``WarmupMsg``, ``ReadyMsg``, ``ProgressMsg``, ``ErrorMsg``, ``FinishedMsg``; orchestrator -> tenant
``WindowCmd`` {t0, t1} and ``StopCmd``. End-of-file on the command pipe means the orchestrator
is gone: the tenant stops as on SIGTERM, so it never outlives it.

``MT_FAULT`` (``faults.py``) injects a crash or a full disk for the fault-injection suite
(``tests/faults/``); unset, as in every real run, nothing is injected.

The serving loop (``RequestLoop``) is single-threaded and does no I/O: prompts are built
before ``ready``, each event is serialised into the event writer's buffer (about a
microsecond; the writer's own thread writes the file), and ``gc.freeze()`` after warm-up keeps
the collector off everything built until then. A ``tok`` line's ``t`` is the engine's: after
the step's device work is synchronised (``hf``), or when a delta was received (``vllm``,
``openai``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gc
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

from multitenant.backends.base import Completion, Emission, Engine, EngineFailed, Iteration
from multitenant.config.schema import ArrivalConfig, WorkloadConfig
from multitenant.events import EventLogError, EventWriter
from multitenant.run.faults import from_env as fault_from_env
from multitenant.run.spec import TenantSpec, import_path
from multitenant.schema import (
    EV_DONE,
    EV_ITER,
    EV_READY,
    EV_RUN_END,
    EV_RUN_START,
    EV_SCHED,
    EV_SENT,
    EV_TOK,
    EV_WINDOW,
    EVENT_SCHEMA_VERSION,
    Counts,
    ErrorMsg,
    FinishedMsg,
    Message,
    ProgressMsg,
    ReadyMsg,
    RequestStatus,
    StopCmd,
    TenantStatus,
    WarmupMsg,
    WindowCmd,
    decode_command,
    encode,
)
from multitenant.workload import RequestSource, RequestSpec, open_loop_schedule

PROGRESS_INTERVAL_NS = 500_000_000
IDLE_SLEEP_MAX_S = 0.005  # longest poll wait: bounds how late a stop is noticed
PREFETCH_MAX = 8192  # requests built before the measured phase at most (the rest in blocks)


class TenantStopped(Exception):
    """The orchestrator asked this tenant to stop (stop command, SIGTERM, or orchestrator gone)."""


# True while the request loop runs: it polls the stop flag between polls of the engine and
# cancels in-flight requests cleanly, so a signal then only sets the flag. Also True once the
# tenant is ending (its error report and cleanup): the orchestrator answers an error with a
# stop, and that must not cut the cleanup short (exit code 0, no run_end). True, too, until
# run_start is written: a stop in the tenant's first milliseconds (a forked tenant gets there
# fast, and the other tenant of a pair may fail as quickly) still leaves run_start and an
# interrupted run_end. Otherwise (model loading, waiting for the window) a signal raises
# TenantStopped at once.
_polling_stop = True


def _allow_stops(stop: threading.Event) -> None:
    """From now on a stop signal raises TenantStopped at once; one that came before does now."""
    global _polling_stop
    _polling_stop = False
    if stop.is_set():
        raise TenantStopped("stop requested")


def _defer_stops() -> None:
    """From now on a stop signal only sets the flag (the tenant is ending anyway)."""
    global _polling_stop
    _polling_stop = True


class ControlChannel:
    """Both ends of the tenant's pipes to the orchestrator."""

    def __init__(self, fd_in: int, fd_out: int, stop: threading.Event) -> None:
        self._out = os.fdopen(fd_out, "w", buffering=1)
        self._in = os.fdopen(fd_in, "r")
        self._stop = stop
        self.window: WindowCmd | None = None
        self._window_set = threading.Event()
        self._thread = threading.Thread(target=self._read_loop, name="control-reader", daemon=True)
        self._thread.start()

    def send(self, msg: Message) -> None:
        try:
            self._out.write(encode(msg) + "\n")
        except (BrokenPipeError, ValueError):
            self._stop.set()

    def _read_loop(self) -> None:
        for line in self._in:
            cmd = decode_command(line)
            if isinstance(cmd, WindowCmd):
                self.window = cmd
                self._window_set.set()
            elif isinstance(cmd, StopCmd):
                self._request_stop()
        # EOF: the orchestrator closed the pipe or died. Stop like on SIGTERM.
        self._request_stop()

    def _request_stop(self) -> None:
        # The SIGTERM handler sets the stop flag, and interrupts the main thread at once when
        # it sits in model loading or waits for the window (not inside the request loop).
        os.kill(os.getpid(), signal.SIGTERM)
        self._window_set.set()

    def wait_window(self, timeout_s: float) -> WindowCmd:
        if not self._window_set.wait(timeout_s) or self.window is None:
            raise TenantStopped("no window announced")
        return self.window


class RequestLoop:
    """Serves one phase of the stream (warm-up or measured) through an engine and logs every event.

    The loop owns arrivals, stop conditions and the log; the engine owns batching (see
    ``backends``). One iteration: submit what is due (``sent`` at the time of the last poll),
    check the stop conditions, poll the engine, write what it reports.

    Ordering rule that keeps ``t`` non-decreasing in the file: before an event at time t is
    written, the ``sched`` line of every open-loop arrival due at or before t is written (at its
    intended time); its ``sent`` follows at the poll's ``now_ns``, after which the engine reports
    nothing older.
    """

    def __init__(
        self,
        engine: Engine,
        writer: EventWriter,
        source: RequestSource,
        task: str,
        stop: threading.Event,
        ctl: ControlChannel | None,
    ) -> None:
        self.engine = engine
        self.w = writer
        self.source = source
        self.task = task
        self.stop = stop
        self.ctl = ctl
        self.counts = Counts()
        self._iter = 0
        self._last_progress_ns = 0

    def serve(
        self,
        arrival: ArrivalConfig,
        start_ns: int,
        end_ns: int | None,
        max_requests: int | None,
    ) -> None:
        closed = not arrival.open_loop
        concurrency = arrival.concurrency or 1
        schedule: list[int] = [] if closed else open_loop_schedule(arrival, start_ns, max_requests, end_ns)
        n_sched = len(schedule)
        next_sched = 0  # index into schedule of the next arrival whose sched is not yet written
        due: collections.deque[RequestSpec] = collections.deque()  # sched written, not yet sent
        issued = 0
        in_flight: dict[int, list[Any]] = {}  # rid -> [request, tokens received]
        w, engine, counts = self.w, self.engine, self.counts
        n_target = self.task == "generate"

        def log_due(t: int) -> None:
            nonlocal next_sched
            while next_sched < n_sched and schedule[next_sched] <= t:
                req = self.source.next()
                w.emit(EV_SCHED, schedule[next_sched], rid=req.rid, n_in=req.n_in, n_out_target=req.n_out if n_target else 0)
                due.append(req)
                next_sched += 1

        def send(req: RequestSpec, t: int) -> None:
            nonlocal issued
            w.emit(EV_SENT, t, rid=req.rid)
            in_flight[req.rid] = [req, 0]
            engine.submit(req)
            issued += 1

        def admit(t: int) -> None:
            if not closed:
                log_due(t)
                while due:
                    send(due.popleft(), t)
                return
            if end_ns is not None and t >= end_ns:
                return  # a request issued now would only be cancelled
            while len(in_flight) < concurrency and (max_requests is None or issued < max_requests):
                req = self.source.next()
                w.emit(EV_SCHED, t, rid=req.rid, n_in=req.n_in, n_out_target=req.n_out if n_target else 0)
                send(req, t)

        def end_all(t: int, status: str, error: str | None = None) -> None:
            rids = list(in_flight)
            if rids:
                engine.cancel(rids)
            for rid in rids:
                req, got = in_flight.pop(rid)
                if error is None:
                    w.emit(EV_DONE, t, rid=rid, n_out=got, status=status)
                else:
                    w.emit(EV_DONE, t, rid=rid, n_out=got, status=status, error=error)
                if status == RequestStatus.CANCELLED:
                    counts.cancelled += 1
                else:
                    counts.errors += 1

        global _polling_stop
        wait_until(start_ns, self.stop)
        _polling_stop = True
        now = time.monotonic_ns()
        try:
            while True:
                admit(now)
                if self.stop.is_set():
                    end_all(now, RequestStatus.CANCELLED)
                    raise TenantStopped("stop requested")
                if end_ns is not None and now >= end_ns:
                    end_all(now, RequestStatus.CANCELLED)
                    return
                if not in_flight:
                    if closed and max_requests is not None and issued >= max_requests:
                        return
                    if not closed and next_sched >= n_sched:
                        return
                # Wait for the engine, but never past the next arrival or the end.
                wake = IDLE_SLEEP_MAX_S
                if next_sched < n_sched:
                    wake = min(wake, (schedule[next_sched] - now) / 1e9)
                if end_ns is not None:
                    wake = min(wake, (end_ns - now) / 1e9)
                try:
                    progress = engine.poll(max(wake, 0.0))
                except EngineFailed as e:
                    end_all(time.monotonic_ns(), RequestStatus.ERROR, f"engine failed: {e}")
                    raise
                for ev in progress.events:
                    if next_sched < n_sched:
                        log_due(ev.t_ns)
                    if type(ev) is Emission:
                        rids, ns = ev.rids, ev.counts
                        if all(rid in in_flight for rid in rids):
                            for rid, n in zip(rids, ns, strict=True):
                                in_flight[rid][1] += n
                        else:  # a late emission of a cancelled request: not logged
                            kept = [(rid, n) for rid, n in zip(rids, ns, strict=True) if rid in in_flight]
                            for rid, n in kept:
                                in_flight[rid][1] += n
                            rids, ns = [k[0] for k in kept], [k[1] for k in kept]
                            if not rids:
                                continue
                        w.emit(EV_TOK, ev.t_ns, rid=rids, n=ns)
                        counts.tokens += sum(ns)
                    elif type(ev) is Completion:
                        entry = in_flight.pop(ev.rid, None)
                        if entry is None:
                            continue
                        extra = ev.fields or {}
                        if ev.error is not None:
                            extra = {"error": ev.error, **extra}
                        w.emit(EV_DONE, ev.t_ns, rid=ev.rid, n_out=entry[1], status=ev.status, **extra)
                        if ev.status == RequestStatus.OK:
                            counts.requests += 1
                        else:
                            counts.errors += 1
                    elif type(ev) is Iteration:
                        w.emit(EV_ITER, ev.t_ns, i=self._iter, batch=ev.batch, dur_ns=ev.dur_ns)
                        self._iter += 1
                now = progress.now_ns
                self._progress(now)
        finally:
            _polling_stop = False

    def _progress(self, t: int) -> None:
        if self.ctl is not None and t - self._last_progress_ns >= PROGRESS_INTERVAL_NS:
            self._last_progress_ns = t
            # t: the live rate is counted from it; a copy: the loop goes on counting in its own
            self.ctl.send(ProgressMsg(t=t, counts=dataclasses.replace(self.counts)))


def wait_until(t_ns: int, stop: threading.Event) -> None:
    """Sleep until monotonic time ``t_ns`` (coarse sleep, then a short spin for the last ms)."""
    while True:
        if stop.is_set():
            raise TenantStopped("stop requested")
        left = t_ns - time.monotonic_ns()
        if left <= 0:
            return
        time.sleep(min(left / 1e9 - 0.001, 0.05) if left > 2_000_000 else 0)


def expected_requests(workload: WorkloadConfig) -> int:
    """How many requests the tenant will likely take (warm-up included): what to prefetch."""
    arrival = workload.arrival
    n = workload.num_requests
    if arrival.open_loop and workload.duration_s is not None and arrival.rate is not None:
        estimate = math.ceil(arrival.rate * workload.duration_s * 1.25) + 16
        n = estimate if n is None else min(n, estimate)
    if n is None:  # closed loop that stops on time: no estimate, the source draws more in blocks
        n = 1024
    return min(n + workload.warmup_requests, PREFETCH_MAX)


def run_tenant(spec: TenantSpec, ctl: ControlChannel | None, stop: threading.Event) -> int:
    """Run one tenant from its spec (written by the orchestrator). Returns the exit code."""
    t_cfg = spec.tenant
    wl = t_cfg.workload
    writer = EventWriter(spec.events_path)
    writer.emit(
        EV_RUN_START,
        tenant=spec.name,
        backend=t_cfg.backend,
        model=t_cfg.model,
        pid=os.getpid(),
        wall_ns=time.time_ns(),
        schema=EVENT_SCHEMA_VERSION,
    )
    loop: RequestLoop | None = None
    engine: Engine | None = None
    status, code = TenantStatus.OK, 0
    try:
        _allow_stops(stop)
        # On disk before loading starts: a tenant that dies while loading (a forked one gets
        # there within milliseconds, before the writer's periodic flush) still shows it started.
        writer.flush()
        engine = import_path(spec.engine)(spec.engine_context(Path(spec.events_path).parent))
        assert engine is not None
        fault = fault_from_env(spec.name)  # None unless MT_FAULT names this tenant (tests/faults)
        if fault is not None:
            fault.load(writer)
        t_load = time.monotonic_ns()
        import_s = (t_load - spec.spawned_ns) / 1e9 if spec.spawned_ns is not None else None
        engine.load()
        load_s = (time.monotonic_ns() - t_load) / 1e9
        if ctl is not None:
            ctl.send(WarmupMsg(load_s=load_s))
        t_warm = time.monotonic_ns()
        engine.warmup()
        source = RequestSource(wl.dataset, vocab_size=engine.vocab_size)
        source.prefetch(expected_requests(wl))  # prompts exist before the window, not inside it
        loop = RequestLoop(engine, writer, source, t_cfg.task, stop, ctl)
        if wl.warmup_requests > 0:
            warmup_arrival = ArrivalConfig(kind="closed", concurrency=t_cfg.max_batch)
            loop.serve(warmup_arrival, time.monotonic_ns(), None, wl.warmup_requests)
        warmup_s = (time.monotonic_ns() - t_warm) / 1e9
        info = engine.device_info()
        engine_info = engine.engine_info()
        child_pids = _child_pids()
        writer.emit(EV_READY, load_s=load_s, warmup_s=warmup_s, pid=os.getpid(), sms=info.sms, device=info.device_name)
        writer.flush()
        # What exists now lives to the end of the run: keep the collector away from it (a full
        # collection walks every object, and the serving loop must not pay for that).
        gc.collect()
        gc.freeze()
        if ctl is None:  # standalone run (tests, debugging): the window starts now
            window = WindowCmd(t0=time.monotonic_ns(), t1=None)
        else:
            ctl.send(
                ReadyMsg(
                    load_s=load_s, warmup_s=warmup_s, pid=os.getpid(), child_pids=child_pids, engine=engine_info,
                    device=info.device, device_name=info.device_name, sms=info.sms,
                    total_memory_bytes=info.total_memory_bytes, probe_error=info.probe_error, import_s=import_s,
                )
            )  # fmt: skip
            window = ctl.wait_window(timeout_s=spec.window_timeout_s)
        writer.emit(EV_WINDOW, t0=window.t0, t1=window.t1)
        if fault is not None:
            fault.window(window.t0, writer)
        loop.counts = Counts()  # run_end counts the measured phase only
        loop.serve(wl.arrival, window.t0, window.t1, wl.num_requests)
    except TenantStopped:
        _defer_stops()
        status, code = TenantStatus.INTERRUPTED, 0
    except Exception as e:
        _defer_stops()
        status, code = TenantStatus.ERROR, 1
        traceback.print_exc()
        _report_failure(spec.name, e, ctl)
    finally:
        _defer_stops()
        if engine is not None:
            try:
                engine.close()
            except Exception as e:  # closing must not hide the run's own outcome
                print(f"tenant {spec.name}: engine close failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        counts = loop.counts if loop is not None else Counts()
        # A log that broke (full disk) takes no run_end; where it broke was reported, unless
        # that was this last flush: then the run's record is incomplete and the tenant failed.
        with contextlib.suppress(EventLogError):
            writer.emit(EV_RUN_END, status=status, counts=dataclasses.asdict(counts))
        try:
            writer.close()
        except EventLogError as e:
            if code == 0:
                status, code = TenantStatus.ERROR, 1
                _report_failure(spec.name, e, ctl)
        if ctl is not None:
            ctl.send(FinishedMsg(status=status, counts=counts))
    return code


def _report_failure(name: str, e: BaseException, ctl: ControlChannel | None) -> None:
    # The last stderr line is what the orchestrator quotes as the reason: make it the
    # cause, on one line (library messages often span several).
    cause = f"{type(e).__name__}: {' '.join(str(e).split())}"[:1000]
    print(f"tenant {name} failed: {cause}", file=sys.stderr, flush=True)
    if ctl is not None:
        ctl.send(ErrorMsg(error=cause))


def _child_pids() -> list[int]:
    """This process's descendants (a vLLM engine core, a launched server and its workers)."""
    try:
        return [c.pid for c in psutil.Process().children(recursive=True)]
    except psutil.Error:
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multitenant.run.tenant", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="spec.json written by the orchestrator")
    parser.add_argument("--ctl-in", type=int, help="fd of the command pipe (orchestrator -> tenant)")
    parser.add_argument("--ctl-out", type=int, help="fd of the message pipe (tenant -> orchestrator)")
    args = parser.parse_args(argv)
    spec = TenantSpec.read(args.spec)
    stop = threading.Event()

    def on_sigterm(signum: int, frame: object) -> None:
        first = not stop.is_set()
        stop.set()
        if first and not _polling_stop:
            raise TenantStopped(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)
    ctl = ControlChannel(args.ctl_in, args.ctl_out, stop) if args.ctl_in is not None else None
    try:
        return run_tenant(spec, ctl, stop)
    except TenantStopped:
        # SIGTERM arrived outside run_tenant's try (e.g. during the final flush): still clean.
        return 0


if __name__ == "__main__":
    sys.exit(main())
