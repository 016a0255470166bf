"""Tenant process: one model, one request stream, one ``events.jsonl``.

Started by the orchestrator as its own OS process (never a thread, never a fork after CUDA
init: one CUDA context each)::

    python -m multitenant.tenant --spec tenants/<name>/spec.json --ctl-in FD --ctl-out FD

Lifecycle: ``run_start`` -> load model -> warm up (compile/capture, then ``warmup_requests``
served closed-loop) -> ``ready`` (to the log and to the orchestrator) -> wait for the window
announcement -> ``window`` -> serve the measured stream until its stop condition -> ``run_end``.

Control channel (JSON lines over two pipes): tenant -> orchestrator ``ready``, ``progress``,
``error``; orchestrator -> tenant ``window`` {t0, t1} and ``stop``. End-of-file on the command
pipe means the orchestrator is gone: the tenant stops as on SIGTERM, so it never outlives it.

The token loop is single-threaded and does no I/O: each ``tok`` line is serialised into the
event writer's buffer (about a microsecond) right after ``engine.step()`` has synchronised the
device, and ``t`` is read after that synchronisation.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Protocol

from multitenant.events import (
    EV_DONE,
    EV_ITER,
    EV_READY,
    EV_RUN_END,
    EV_RUN_START,
    EV_SCHED,
    EV_SENT,
    EV_TOK,
    EV_WINDOW,
    SCHEMA_VERSION,
    STATUS_CANCELLED,
    STATUS_OK,
    EventWriter,
)
from multitenant.workload import RequestSource, RequestSpec, open_loop_schedule

PROGRESS_INTERVAL_NS = 500_000_000
IDLE_SLEEP_MAX_S = 0.005  # idle wait granularity: bounds how late a stop or an arrival is noticed


class TenantStopped(Exception):
    """The orchestrator asked this tenant to stop (stop command, SIGTERM, or orchestrator gone)."""


# True while the request loop runs: it polls the stop flag between steps and cancels in-flight
# requests cleanly, so a signal then only sets the flag. Outside it (model loading, waiting for
# the window) a signal raises TenantStopped at once.
_polling_stop = False


class Engine(Protocol):
    """What the request loop needs from a backend (see backend_hf.HFEngine)."""

    vocab_size: int

    def start_batch(self, prompts: list[list[int]], n_out: list[int]) -> None: ...

    def step(self) -> list[int]: ...

    def forward_batch(self, prompts: list[list[int]]) -> None: ...


class ControlChannel:
    """Both ends of the tenant's pipes to the orchestrator."""

    def __init__(self, fd_in: int, fd_out: int, stop: threading.Event) -> None:
        self._out = os.fdopen(fd_out, "w", buffering=1)
        self._in = os.fdopen(fd_in, "r")
        self._stop = stop
        self.window: dict[str, Any] | None = None
        self._window_set = threading.Event()
        self._thread = threading.Thread(target=self._read_loop, name="control-reader", daemon=True)
        self._thread.start()

    def send(self, msg: str, **fields: Any) -> None:
        try:
            self._out.write(json.dumps({"msg": msg, **fields}) + "\n")
        except (BrokenPipeError, ValueError):
            self._stop.set()

    def _read_loop(self) -> None:
        for line in self._in:
            cmd = json.loads(line)
            if cmd.get("cmd") == "window":
                self.window = cmd
                self._window_set.set()
            elif cmd.get("cmd") == "stop":
                self._request_stop()
        # EOF: the orchestrator closed the pipe or died. Stop like on SIGTERM.
        self._request_stop()

    def _request_stop(self) -> None:
        # The SIGTERM handler sets the stop flag, and interrupts the main thread at once when
        # it sits in model loading or waits for the window (not inside the request loop).
        os.kill(os.getpid(), signal.SIGTERM)
        self._window_set.set()

    def wait_window(self, timeout_s: float) -> dict[str, Any]:
        if not self._window_set.wait(timeout_s) or self.window is None:
            raise TenantStopped("no window announced")
        return self.window


class RequestLoop:
    """Serves one phase of the stream (warm-up or measured) and logs every event.

    Ordering rule that keeps ``t`` non-decreasing in the file: before any event at time t is
    written, every open-loop arrival due at or before t is written (``sched`` at its intended
    time, then ``sent`` at t).
    """

    def __init__(
        self,
        engine: Engine,
        writer: EventWriter,
        source: RequestSource,
        task: str,
        max_batch: int,
        stop: threading.Event,
        ctl: ControlChannel | None,
    ) -> None:
        self.engine = engine
        self.w = writer
        self.source = source
        self.task = task
        self.max_batch = max_batch
        self.stop = stop
        self.ctl = ctl
        self.counts = {"requests": 0, "tokens": 0, "errors": 0, "cancelled": 0}
        self._iter = 0
        self._last_progress_ns = 0

    def serve(
        self,
        arrival: dict[str, Any],
        start_ns: int,
        end_ns: int | None,
        max_requests: int | None,
    ) -> None:
        closed = arrival["kind"] == "closed"
        schedule: list[int] = [] if closed else open_loop_schedule(arrival, start_ns, max_requests, end_ns)
        next_sched = 0  # index into schedule of the next arrival not yet logged
        issued = 0
        in_flight = 0  # sent and not done
        waiting: collections.deque[RequestSpec] = collections.deque()
        batch: list[RequestSpec] = []
        got: list[int] = []
        w = self.w
        generates = self.task == "generate"

        def admit(t: int) -> None:
            nonlocal next_sched, issued, in_flight
            if closed:
                while in_flight < arrival["concurrency"] and (max_requests is None or issued < max_requests):
                    req = self.source.next()
                    w.emit(EV_SCHED, t, rid=req.rid, n_in=req.n_in, n_out_target=req.n_out if generates else 0)
                    w.emit(EV_SENT, t, rid=req.rid)
                    waiting.append(req)
                    issued += 1
                    in_flight += 1
                return
            first = next_sched
            while next_sched < len(schedule) and schedule[next_sched] <= t:
                next_sched += 1
            new = [self.source.next() for _ in range(next_sched - first)]
            for req, ts in zip(new, schedule[first:next_sched], strict=True):
                w.emit(EV_SCHED, ts, rid=req.rid, n_in=req.n_in, n_out_target=req.n_out if generates else 0)
            for req in new:
                w.emit(EV_SENT, t, rid=req.rid)
                waiting.append(req)
            issued += len(new)
            in_flight += len(new)

        def cancel_all(t: int) -> None:
            nonlocal in_flight
            for i, req in enumerate(batch):
                if got[i] < req.n_out:
                    w.emit(EV_DONE, t, rid=req.rid, n_out=got[i], status=STATUS_CANCELLED)
                    self.counts["cancelled"] += 1
            for req in waiting:
                w.emit(EV_DONE, t, rid=req.rid, n_out=0, status=STATUS_CANCELLED)
                self.counts["cancelled"] += 1
            batch.clear()
            waiting.clear()
            in_flight = 0

        global _polling_stop
        wait_until(start_ns, self.stop)
        _polling_stop = True
        try:
            while True:
                now = time.monotonic_ns()
                if self.stop.is_set():
                    cancel_all(now)
                    raise TenantStopped("stop requested")
                if end_ns is not None and now >= end_ns:
                    cancel_all(now)
                    return
                admit(now)
                if not batch and waiting:
                    take = min(self.max_batch, len(waiting))
                    batch = [waiting.popleft() for _ in range(take)]
                    got = [0] * take
                    if self.task == "generate":
                        self.engine.start_batch([r.prompt_ids for r in batch], [r.n_out for r in batch])
                if batch:
                    if self.task == "forward":
                        t_start = time.monotonic_ns()
                        self.engine.forward_batch([r.prompt_ids for r in batch])
                        t = time.monotonic_ns()
                        admit(t)
                        w.emit(EV_ITER, t, i=self._iter, batch=len(batch), dur_ns=t - t_start)
                        self._iter += 1
                        for req in batch:
                            w.emit(EV_DONE, t, rid=req.rid, n_out=0, status=STATUS_OK)
                        self.counts["requests"] += len(batch)
                        in_flight -= len(batch)
                        batch = []
                    else:
                        idx = self.engine.step()
                        t = time.monotonic_ns()  # after step(): the device work is synchronised
                        admit(t)
                        if idx:
                            w.emit(EV_TOK, t, rid=[batch[i].rid for i in idx], n=[1] * len(idx))
                            self.counts["tokens"] += len(idx)
                            for i in idx:
                                got[i] += 1
                                if got[i] == batch[i].n_out:
                                    w.emit(EV_DONE, t, rid=batch[i].rid, n_out=got[i], status=STATUS_OK)
                                    self.counts["requests"] += 1
                                    in_flight -= 1
                        if not idx or all(g >= r.n_out for g, r in zip(got, batch, strict=True)):
                            batch = []
                    self._progress(t)
                    continue
                # Idle: nothing to run. Done when every request has been issued and finished.
                if max_requests is not None and issued >= max_requests and in_flight == 0:
                    return
                if not closed and next_sched >= len(schedule) and in_flight == 0:
                    return
                self._progress(now)
                # Sleep until the next arrival or the end, but never longer than IDLE_SLEEP_MAX_S.
                nxt = schedule[next_sched] if (not closed and next_sched < len(schedule)) else None
                wake = [x for x in (nxt, end_ns) if x is not None]
                sleep_s = min([IDLE_SLEEP_MAX_S] + [(x - now) / 1e9 for x in wake])
                if sleep_s > 0:
                    time.sleep(sleep_s)
        finally:
            _polling_stop = False

    def _progress(self, t: int) -> None:
        if self.ctl is not None and t - self._last_progress_ns >= PROGRESS_INTERVAL_NS:
            self._last_progress_ns = t
            self.ctl.send("progress", **self.counts)


def wait_until(t_ns: int, stop: threading.Event) -> None:
    """Sleep until monotonic time ``t_ns`` (coarse sleep, then a short spin for the last ms)."""
    while True:
        if stop.is_set():
            raise TenantStopped("stop requested")
        left = t_ns - time.monotonic_ns()
        if left <= 0:
            return
        time.sleep(min(left / 1e9 - 0.001, 0.05) if left > 2_000_000 else 0)


def run_tenant(spec: dict[str, Any], ctl: ControlChannel | None, stop: threading.Event) -> int:
    """Run one tenant from its spec (plain data written by the orchestrator). Returns exit code."""
    t_cfg = spec["tenant"]
    wl = t_cfg["workload"]
    writer = EventWriter(spec["events_path"])
    writer.emit(
        EV_RUN_START,
        tenant=spec["name"],
        backend=t_cfg["backend"],
        model=t_cfg["model"],
        pid=os.getpid(),
        wall_ns=time.time_ns(),
        schema=SCHEMA_VERSION,
    )
    loop: RequestLoop | None = None
    status, code = "ok", 0
    try:
        from multitenant.backend_hf import HFEngine

        max_in, max_out = RequestSource(wl["dataset"], vocab_size=2**31).max_lengths()
        engine = HFEngine(
            model=t_cfg["model"],
            dtype=t_cfg["dtype"],
            device=spec["engine_device"],
            execution=t_cfg["execution"],
            task=t_cfg["task"],
            max_batch=t_cfg["max_batch"],
            max_input_len=max_in,
            max_output_len=max_out,
        )
        t_load = time.monotonic_ns()
        engine.load()
        load_s = (time.monotonic_ns() - t_load) / 1e9
        t_warm = time.monotonic_ns()
        engine.warmup()
        source = RequestSource(wl["dataset"], vocab_size=engine.vocab_size)
        loop = RequestLoop(engine, writer, source, t_cfg["task"], t_cfg["max_batch"], stop, ctl)
        if wl["warmup_requests"] > 0:
            loop.serve(
                {"kind": "closed", "concurrency": t_cfg["max_batch"]},
                time.monotonic_ns(),
                None,
                wl["warmup_requests"],
            )
        warmup_s = (time.monotonic_ns() - t_warm) / 1e9
        info = engine.device_info()
        writer.emit(EV_READY, load_s=load_s, warmup_s=warmup_s, pid=os.getpid(), sms=info.get("sms"), device=info.get("device_name"))
        writer.flush()
        if ctl is None:  # standalone run (tests, debugging): the window starts now
            window: dict[str, Any] = {"t0": time.monotonic_ns(), "t1": None}
        else:
            ctl.send("ready", load_s=load_s, warmup_s=warmup_s, pid=os.getpid(), **info)
            window = ctl.wait_window(timeout_s=spec["window_timeout_s"])
        t0 = int(window["t0"])
        t1 = window.get("t1")
        writer.emit(EV_WINDOW, t0=t0, t1=t1)
        loop.counts = {k: 0 for k in loop.counts}  # run_end counts the measured phase only
        loop.serve(wl["arrival"], t0, t1, wl["num_requests"])
    except TenantStopped:
        status, code = "interrupted", 0
    except Exception as e:
        status, code = "error", 1
        traceback.print_exc()
        # The last stderr line is what the orchestrator quotes as the reason: make it the
        # cause, on one line (library messages often span several).
        cause = f"{type(e).__name__}: {' '.join(str(e).split())}"[:1000]
        print(f"tenant {spec['name']} failed: {cause}", file=sys.stderr, flush=True)
        if ctl is not None:
            ctl.send("error", error=cause)
    finally:
        counts = loop.counts if loop is not None else {}
        writer.emit(EV_RUN_END, status=status, counts=counts)
        writer.close()
        if ctl is not None:
            ctl.send("finished", status=status, counts=counts)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multitenant.tenant", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="spec.json written by the orchestrator")
    parser.add_argument("--ctl-in", type=int, help="fd of the command pipe (orchestrator -> tenant)")
    parser.add_argument("--ctl-out", type=int, help="fd of the message pipe (tenant -> orchestrator)")
    args = parser.parse_args(argv)
    with open(args.spec, encoding="utf-8") as f:
        spec = json.load(f)
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
