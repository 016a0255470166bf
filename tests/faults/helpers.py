"""What every fault test does: run ``mt-run`` in a subprocess while recording each process it
starts (tenants, their children and grandchildren), then check what the fault left: the exit
code, the manifest, no process alive, and every event written so far readable."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import psutil

from tests.event_checks import check_request_invariants
from tests.integration.test_openai_faults import leftovers as manifest_leftovers

PAIR = "multitenant/pair_tiny"
CRASH_EXIT_CODE = 86  # multitenant.run.faults.CRASH_EXIT_CODE (not imported: the tests pin the value)


def short(duration_s: float, *names: str) -> list[str]:
    """Overrides for a quick run: no live display, each tenant's window ``duration_s`` long."""
    return ["progress=false", *(f"tenants.{n}.workload.duration_s={duration_s}" for n in names or ("a", "b"))]


class Watched:
    """``mt-run`` in a subprocess, and a thread that records every process descending from it
    (or from a process recorded before: a tenant whose orchestrator died is still followed)
    until ``leftovers`` is asked, so a process that outlives the run is found by identity."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, **popen: Any) -> None:
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "multitenant.cli", *args], env=env, cwd=cwd, text=True, **popen
        )
        self.seen: dict[int, psutil.Process] = {}
        self._root = psutil.Process(self.proc.pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watch-mt-run", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            for root in [self._root, *self.seen.values()]:
                try:
                    for child in root.children(recursive=True):
                        self.seen.setdefault(child.pid, child)
                except psutil.Error:
                    continue
            time.sleep(0.05)

    def wait(self, timeout: float = 150) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"mt-run did not end within {timeout} s; stderr: {err[-2000:]}") from None
        return self.proc.returncode, out or "", err or ""

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def alive(self) -> list[psutil.Process]:
        out = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def leftovers(self, grace_s: float = 3.0) -> list[str]:
        """The processes this run started that still live after ``grace_s`` (zombies excepted);
        stops the watch. Survivors are killed after they are listed, so one test cannot leak
        into the next."""
        deadline = time.monotonic() + grace_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        self._stop.set()
        self._thread.join(timeout=5)
        left = []
        for p in self.alive():
            try:
                left.append(f"pid {p.pid}: {' '.join(p.cmdline())[:200]}")
                p.kill()
            except psutil.Error:
                continue
        return left


def processes_left(run: Watched, manifest: dict[str, Any] | None, marker: Path, grace_s: float = 3.0) -> list[str]:
    """Everything of the run still alive: what the watch saw, plus what the manifest names
    (tenant pids, child pids, servers, process groups) and any process whose command line holds
    ``marker`` (the test's folder: tenants' spec paths, test servers' logs)."""
    by_pid = {int(re.findall(r"\d+", x)[0]): x for x in run.leftovers(grace_s)}
    for x in manifest_leftovers(manifest, str(marker)):  # "tenant a pid 12", "... process group 12", "pid 12: cmd"
        pid = int(re.findall(r"(\d+)(?::|$)", x)[0])
        if "process group" in x and not live_group_members(pid):
            continue  # only zombies left in it: a tenant orphaned by a killed mt-run, not yet reaped by init
        by_pid.setdefault(pid, x)
    return sorted(by_pid.values())


def live_group_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are not zombies (``killpg(pgid, 0)`` counts those)."""
    members = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(p.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return members


def manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "manifest.json").read_text())


def wait_for_window(run: Watched, run_dir: Path, after_s: float = 1.0, timeout_s: float = 120) -> dict[str, Any]:
    """The manifest once the window has been open for ``after_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if run.proc.poll() is not None:
            raise AssertionError(f"mt-run ended (code {run.proc.returncode}) before its window opened")
        try:
            m = manifest(run_dir)
        except (OSError, ValueError):
            m = None
        if m and m["window"]["t0_ns"] and time.monotonic_ns() > m["window"]["t0_ns"] + int(after_s * 1e9):
            return m
        time.sleep(0.1)
    run.proc.kill()
    raise AssertionError("the window never opened")


def read_log(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Every event of an events.jsonl and the number of lines that could not be read (a torn
    last line counts as one)."""
    lines = path.read_bytes().split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    lost = 1 if torn else 0
    events = []
    for line in lines:
        try:
            events.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            lost += 1
    return events, lost


def check_prefix(events: list[dict[str, Any]]) -> None:
    """What any prefix of a tenant's log must hold, however the tenant ended: run_start first,
    t never decreasing, each request's sched, sent and done once and in that order, tok lines
    only for requests sent and not yet done, a done's n_out equal to the tokens logged."""
    assert events and events[0]["ev"] == "run_start" and events[0]["schema"] == 1, events[:1]
    ts = [e["t"] for e in events]
    assert ts == sorted(ts), "t never decreases within a file"
    kinds = [e["ev"] for e in events]
    if "window" in kinds:
        assert "ready" in kinds and kinds.index("ready") < kinds.index("window")
    assert "run_end" not in kinds[:-1], "run_end is the last line"
    stage: dict[int, str] = {}
    toks: dict[int, int] = {}
    order = {"sched": None, "sent": "sched", "done": "sent"}
    for e in events:
        if e["ev"] in order:
            rid = e["rid"]
            assert stage.get(rid) == order[e["ev"]], f"request {rid}: {e['ev']} after {stage.get(rid)}"
            stage[rid] = e["ev"]
            if e["ev"] == "done":
                assert e["n_out"] == toks.get(rid, 0), f"request {rid}: done.n_out equals its logged tokens"
        elif e["ev"] == "tok":
            for rid, n in zip(e["rid"], e["n"], strict=True):
                assert stage.get(rid) == "sent", f"tok for request {rid}, which is {stage.get(rid) or 'unknown'}"
                toks[rid] = toks.get(rid, 0) + n


def unaccounted(events: list[dict[str, Any]]) -> int:
    """For a log that ends with run_end: how far its counts (the measured phase's requests,
    tokens, errors, cancelled) are from the events logged after the window line; 0 means no
    event the tenant counted is missing from the file."""
    kinds = [e["ev"] for e in events]
    if "window" not in kinds:
        return 0  # stopped before its measured phase: run_end counts warm-up, nothing to match
    measured = events[kinds.index("window") :]
    logged = {
        "tokens": sum(sum(e["n"]) for e in measured if e["ev"] == "tok"),
        "requests": sum(1 for e in measured if e["ev"] == "done" and e["status"] == "ok"),
        "errors": sum(1 for e in measured if e["ev"] == "done" and e["status"] == "error"),
        "cancelled": sum(1 for e in measured if e["ev"] == "done" and e["status"] == "cancelled"),
    }
    counts = events[-1]["counts"]
    return sum(abs(int(counts.get(k, 0)) - v) for k, v in logged.items())


def check_logs(run_dir: Path, run_end: dict[str, str | None]) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Read every tenant's events.jsonl and check it; ``run_end`` gives per tenant the status
    its log must end with, or None for a tenant that died without its cleanup (no run_end).
    Returns the events per tenant and the events lost over all of them (unreadable lines, and
    counted events missing from a log that ended with run_end)."""
    logs: dict[str, list[dict[str, Any]]] = {}
    lost = 0
    for name, status in run_end.items():
        events, unreadable = read_log(run_dir / "tenants" / name / "events.jsonl")
        lost += unreadable
        check_prefix(events)
        last = events[-1]
        if status is None:
            assert last["ev"] != "run_end", f"tenant {name} died without its cleanup, yet its log ends with run_end"
        else:
            assert last["ev"] == "run_end" and last["status"] == status, f"tenant {name} ends with {last}"
            check_request_invariants(events)
            lost += unaccounted(events)
        logs[name] = events
    return logs, lost


class Ended(NamedTuple):
    """What a fault test checks once ``mt-run`` has exited (``finish``)."""

    code: int
    out: str
    err: str
    manifest: dict[str, Any]
    logs: dict[str, list[dict[str, Any]]]
    left: list[str]
    lost: int


def finish(
    run: Watched,
    run_dir: Path,
    marker: Path,
    fault: Callable[..., None],
    run_end: dict[str, str | None],
    timeout_s: float = 150,
) -> Ended:
    """Wait for ``mt-run``, then read its manifest, the processes left (``marker``: the test's
    folder, see ``processes_left``) and every tenant's log (``check_logs`` with ``run_end``),
    and count the case into the suite's tally (``fault``)."""
    code, out, err = run.wait(timeout_s)
    m = manifest(run_dir)
    left = processes_left(run, m, marker)
    logs, lost = check_logs(run_dir, run_end)
    fault(processes_left=left, events_lost=lost)
    return Ended(code, out, err, m, logs, left, lost)


# -- mode mps against the fake control daemon (fixture fake_mps) ---------------------------------

SOLO_OPENAI, SOLO_T = "solo/openai_tiny", "openai_tiny_cpu"  # an openai tenant: no CUDA, no torch


def mps_openai_args(tmp_path: Path, run_dir: Path, duration_s: float) -> list[str]:
    """solo/openai_tiny in mode mps on the CPU: its tenant launches the SSE test server (a
    grandchild of mt-run) and never touches CUDA, so only the harness's MPS path is exercised."""
    from tests.integration.test_openai_faults import sse_launch, tenant_overrides

    return [
        "--config-name", SOLO_OPENAI, f"hydra.run.dir={run_dir}", "progress=false", "mode=mps", "device=cuda:0",
        "mps.stop_timeout_s=2", *tenant_overrides(SOLO_T, sse_launch(tmp_path, "s"), duration_s=duration_s),
    ]  # fmt: skip


def attach_when_started(run: Watched, run_dir: Path, tenant: str, timeout_s: float = 60) -> int:
    """Make ``tenant`` a client of the run's fake daemon as soon as it is spawned, well before
    the harness checks attachment at ready (what CUDA does at a real client's first call)."""
    from multitenant.run.mps import control as mps_control

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and run.proc.poll() is None:
        try:
            m = manifest(run_dir)
        except (OSError, ValueError):
            m = None
        pid = m and m["tenants"][tenant]["pid"]
        pipe = m and (m.get("mps") or {}).get("pipe_dir")
        if pid and pipe:
            reply = mps_control.control_command(Path(pipe), f"fake_attach {pid}", 5.0)
            assert reply.returncode == 0, reply
            return int(pid)
        time.sleep(0.02)
    raise AssertionError(f"tenant {tenant} never started under the run's daemon")


def mt_mps(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``mt-mps ARGS``, as a user types it after a run was killed."""
    return subprocess.run(
        [sys.executable, "-m", "multitenant.run.mps.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


def mt_analyze(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "multitenant.analysis.cli", *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )
