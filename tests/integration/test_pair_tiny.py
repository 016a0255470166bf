"""pair_tiny end to end on the CPU: real processes, real tiny Llama, real event files."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.event_checks import check_request_invariants, read_events

pytestmark = pytest.mark.slow

SHORT = ["progress=false", "tenants.a.workload.duration_s=3", "tenants.b.workload.duration_s=3"]


def mt_run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "multitenant.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def tenant_pids_alive(manifest: dict[str, Any]) -> list[int]:
    alive = []
    for t in manifest["tenants"].values():
        pid = t["pid"]
        if pid is None:
            continue
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
        try:  # nothing left in the tenant's process group either
            os.killpg(pid, 0)
            alive.append(-pid)
        except ProcessLookupError:
            pass
    return alive


def check_events(path: Path) -> dict[str, Any]:
    events = read_events(path)
    assert events[0]["ev"] == "run_start" and events[0]["schema"] == 1
    kinds = [e["ev"] for e in events]
    if "window" in kinds:
        assert kinds.index("ready") < kinds.index("window")
    assert kinds[-1] == "run_end", "the tenant exited through its own cleanup"
    per = check_request_invariants(events)
    return {"events": events, "requests": per}


def test_pair_tiny_end_to_end(tmp_path: Path, mt_env: dict[str, str]) -> None:
    run_dir = tmp_path / "run"
    t_start = time.monotonic()
    res = mt_run(["--config-name", "multitenant/pair_tiny", f"hydra.run.dir={run_dir}", *SHORT], mt_env, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert time.monotonic() - t_start < 60, "pair_tiny runs in under a minute"
    # Folder contract (docs/design.md).
    for rel in (".hydra/config.yaml", ".hydra/overrides.yaml", "config.resolved.yaml", "manifest.json", "telemetry.jsonl"):
        assert (run_dir / rel).is_file(), rel
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "ok" and m["reason"] is None and m["mode"] == "cpu"
    assert m["schema_version"] == 1 and m["run_id"] and m["ended_wall"]
    assert m["window"]["t0_ns"] < m["window"]["t1_ns"]
    assert m["packages"]["torch"] and m["packages"]["multitenant"]
    window_t0 = m["window"]["t0_ns"]
    for name in ("a", "b"):
        tdir = run_dir / "tenants" / name
        assert (tdir / "stdout.log").is_file() and (tdir / "stderr.log").is_file()
        got = check_events(tdir / "events.jsonl")
        assert m["tenants"][name]["exit_code"] == 0 and m["tenants"][name]["load_s"] is not None
        ev = got["events"]
        assert ev[-1]["ev"] == "run_end" and ev[-1]["status"] == "ok"
        window = next(e for e in ev if e["ev"] == "window")
        assert window["t0"] == window_t0 and window["t1"] == window_t0 + 3_000_000_000
        measured = [r for r in got["requests"].values() if r["sent"]["t"] >= window_t0]
        assert sum(r["done"]["status"] == "ok" for r in measured) >= 4, "the tenant made progress"
        assert ev[-1]["counts"]["tokens"] > 0
    # Both tenants shared one clock: their measured phases overlap.
    tel = [json.loads(x) for x in (run_dir / "telemetry.jsonl").read_text().splitlines()]
    assert len(tel) >= 10 and set(tel[len(tel) // 2]["tenant_cpu_pct"]) == {"a", "b"}
    assert tenant_pids_alive(m) == []


# The existing run dir, bad config values, a tenant killed mid-window, signals to mt-run and a
# closed output pipe are faults: tests/faults/ has one test each.


def test_tenant_failing_to_load_fails_the_run(tmp_path: Path, mt_env: dict[str, str]) -> None:
    run_dir = tmp_path / "run"
    env = dict(mt_env, HF_HUB_OFFLINE="1")
    res = mt_run(
        ["--config-name", "multitenant/pair_tiny", f"hydra.run.dir={run_dir}", *SHORT,
         "tenants.b.model=no-such-org/no-such-model"], env, tmp_path
    )
    assert res.returncode == 1
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "failed"
    assert m["reason"].startswith("tenant b failed"), m["reason"]
    assert "no-such-model" in m["reason"] or "no-such-org" in m["reason"]
    assert tenant_pids_alive(m) == []
    check_events(run_dir / "tenants" / "a" / "events.jsonl")


def test_duplicate_tenant_names_exit_2(tmp_path: Path, mt_env: dict[str, str], repo_root: Path) -> None:
    cfg = tmp_path / "configs"
    (cfg / "multitenant").mkdir(parents=True)
    (cfg / "multitenant" / "dup.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /experiment_schema\n  - _self_\nname: dup\nmode: cpu\ntenants:\n"
        "  a:\n    model: synthetic:tiny-llama\n    workload: {duration_s: 1}\n"
        "  a:\n    model: synthetic:tiny-llama\n    workload: {duration_s: 1}\n"
    )
    env = dict(mt_env, MT_CONFIG_DIR=str(cfg))
    res = mt_run(["--config-name", "multitenant/dup", f"hydra.run.dir={tmp_path / 'run'}"], env, tmp_path, 60)
    assert res.returncode == 2
    assert "tenant name 'a' appears twice" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_sweep_job_failure_does_not_stop_the_others(tmp_path: Path, mt_env: dict[str, str]) -> None:
    sweep = tmp_path / "sweep"
    env = dict(mt_env, HF_HUB_OFFLINE="1")
    res = mt_run(
        ["-m", "--config-name", "multitenant/pair_tiny", f"hydra.sweep.dir={sweep}", "progress=false",
         "tenants.a.workload.duration_s=2", "tenants.b.workload.duration_s=2",
         "tenants.b.model=no-such-org/no-such-model,synthetic:tiny-llama"], env, tmp_path, 180
    )
    assert res.returncode == 1, res.stderr[-2000:]
    statuses = [json.loads((sweep / f"job{i}" / "manifest.json").read_text())["status"] for i in (0, 1)]
    assert statuses == ["failed", "ok"]
    for i in (0, 1):
        assert tenant_pids_alive(json.loads((sweep / f"job{i}" / "manifest.json").read_text())) == []


def test_sweep_with_a_bad_value_runs_the_good_jobs(tmp_path: Path, mt_env: dict[str, str]) -> None:
    sweep = tmp_path / "sweep"
    res = mt_run(
        ["-m", "--config-name", "multitenant/pair_tiny", f"hydra.sweep.dir={sweep}", "progress=false",
         "tenants.a.workload.duration_s=2", "tenants.b.workload.duration_s=2", "tenants.a.max_batch=0,2"],
        mt_env, tmp_path, 180,
    )
    assert res.returncode == 2
    assert "tenants.a.max_batch" in res.stderr
    assert not (sweep / "job0").exists(), "a job refused for its config leaves no folder"
    assert json.loads((sweep / "job1" / "manifest.json").read_text())["status"] == "ok"


def test_ready_barrier_timeout(tmp_path: Path, mt_env: dict[str, str]) -> None:
    run_dir = tmp_path / "run"
    res = mt_run(["--config-name", "multitenant/pair_tiny", f"hydra.run.dir={run_dir}", *SHORT, "ready_timeout_s=0.5"],
                 mt_env, tmp_path)
    assert res.returncode == 1
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "failed" and "not ready after ready_timeout_s=0.5" in m["reason"]
    assert tenant_pids_alive(m) == []


def test_no_arguments_prints_usage_and_exits_2(mt_env: dict[str, str]) -> None:
    r = subprocess.run([sys.executable, "-m", "multitenant.cli"], env=mt_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "--config-name" in r.stderr
    assert "multitenant/pair_tiny" in r.stderr and "solo/tiny_llama" in r.stderr
    assert len(r.stderr.splitlines()) < 60


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--info"], "Hydra"),
        (["--info", "defaults"], "Defaults List"),
        (["--cfg", "job"], "name: pair_tiny"),
        (["--cfg", "job", "--resolve"], "name: pair_tiny"),
    ],
)
def test_hydra_flags_work_after_the_overrides(mt_env: dict[str, str], flags: list[str], needle: str) -> None:
    # mt-run adds its own overrides; they must not become the value of a trailing flag.
    argv = [sys.executable, "-m", "multitenant.cli", "--config-name", "multitenant/pair_tiny", "tenants.a.workload.duration_s=3", *flags]
    r = subprocess.run(argv, env=mt_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert needle in r.stdout


def test_unknown_key_added_with_plus_exits_2(tmp_path: Path, mt_env: dict[str, str]) -> None:
    argv = [sys.executable, "-m", "multitenant.cli", "--config-name", "multitenant/pair_tiny",
            "+tenants.a.workload.duraton_s=10", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    r = subprocess.run(argv, env=mt_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "did you mean tenants.a.workload.duration_s?" in r.stderr
    assert not (tmp_path / "run" / "manifest.json").exists()


@pytest.mark.parametrize("tenant_start", ["spawn", "fork"])
def test_cpu_threads_come_from_the_spec(tmp_path: Path, mt_env: dict[str, str], tenant_start: str) -> None:
    # The thread count is the tenant's, whatever the number of tenants or the caller's env,
    # and whether the tenant was started fresh or forked from the zygote (which started
    # without OMP_NUM_THREADS and sets the count in the child).
    run_dir = tmp_path / "run"
    env = {**mt_env, "OMP_NUM_THREADS": "7"}
    argv = [sys.executable, "-m", "multitenant.cli", "--config-name", "multitenant/pair_tiny", "progress=false",
            "tenants.a.workload.duration_s=1", "tenants.b.workload.duration_s=1", "tenants.b.cpu_threads=2",
            f"tenant_start={tenant_start}", f"hydra.run.dir={run_dir}"]  # fmt: skip
    p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 120
    # /proc/<pid>/environ shows the environment a process was exec'd with: a forked tenant's is
    # the zygote's (its own is set with putenv after the fork), so it is read for spawn only.
    while tenant_start == "spawn" and len(seen) < 2 and time.monotonic() < deadline and p.poll() is None:
        try:
            m = json.loads((run_dir / "manifest.json").read_text())
        except (OSError, ValueError):
            time.sleep(0.1)
            continue
        for name, t in m["tenants"].items():
            if t["pid"] and name not in seen:
                with contextlib.suppress(psutil.Error):
                    seen[name] = psutil.Process(t["pid"]).environ().get("OMP_NUM_THREADS", "")
        time.sleep(0.1)
    assert p.wait(timeout=180) == 0, p.stderr.read() if p.stderr else ""
    if tenant_start == "spawn":
        assert seen == {"a": "1", "b": "2"}
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["tenant_start"] == tenant_start
    assert {n: (t["start"], t["engine"]["torch_threads"]) for n, t in m["tenants"].items()} == {
        "a": (tenant_start, 1), "b": (tenant_start, 2)
    }
    for name in ("a", "b"):  # nothing on stderr: its last line would be quoted as a failure's reason
        assert (run_dir / "tenants" / name / "stderr.log").read_text() == ""
    assert m["tenants"]["a"]["cpu_threads"] == 1 and m["tenants"]["b"]["cpu_threads"] == 2


def test_help_says_what_modes_shares_and_workloads_are(mt_env: dict[str, str]) -> None:
    r = subprocess.run([sys.executable, "-m", "multitenant.cli", "--help"], env=mt_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    for needle in ("mode=mps | mps_external | timeslice | cpu", "active_thread_pct", "arrival.kind=closed", "split=70/30"):
        assert needle in r.stdout, needle
