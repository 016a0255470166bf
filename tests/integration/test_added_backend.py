"""Adding a backend is one file and one line: ``tests/backends/scripted.py`` (a scripted token
source) registered with ``BACKENDS["scripted"] = SCRIPTED``, run through ``mt-run`` end to end
and analysed by ``mt-analyze``, with nothing else of src/ touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.event_checks import check_request_invariants, read_events

pytestmark = pytest.mark.slow

# The one line, then mt-run's own entry point: the tenant processes import the engine by the
# path the declaration names, so they need no registry of their own.
MT_RUN_WITH_SCRIPTED = (
    "from multitenant.backends import BACKENDS; from tests.backends.scripted import SCRIPTED; "
    "BACKENDS['scripted'] = SCRIPTED; from multitenant.cli import run_main; run_main()"
)
T = "tenants.tiny_llama_cpu"


def test_a_backend_added_outside_src_runs_through_mt_run(tmp_path: Path, mt_env: dict[str, str]) -> None:
    env = {**mt_env, "PYTHONPATH": os.pathsep.join([str(REPO), mt_env.get("PYTHONPATH", "")])}
    run_dir = tmp_path / "run"
    args = [
        "--config-name", "solo/tiny_llama", f"hydra.run.dir={run_dir}", "progress=false",
        f"{T}.backend=scripted", f"{T}.scripted.step_ms=5", f"{T}.workload.duration_s=2",
    ]  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-c", MT_RUN_WITH_SCRIPTED, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    record = manifest["tenants"]["tiny_llama_cpu"]
    assert manifest["status"] == "ok" and record["backend"] == "scripted"
    assert record["engine"] == {"engine": "scripted", "step_ms": 5.0}
    assert record["identity"]["options"] == {"step_ms": 5.0}, "the backend's declared identity is recorded"
    events = read_events(run_dir / "tenants" / "tiny_llama_cpu" / "events.jsonl")
    per = check_request_invariants(events)
    assert sum(r["tok"] for r in per.values()) > 100

    # A bad option is refused by the declaration's own check, before anything starts.
    bad = subprocess.run(
        [sys.executable, "-c", MT_RUN_WITH_SCRIPTED, *args[:1], "solo/tiny_llama", f"hydra.run.dir={tmp_path / 'bad'}",
         f"{T}.backend=scripted", f"{T}.scripted.step_ms=0"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and f"{T}.scripted.step_ms: must be > 0" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "bad").exists()

    # mt-analyze reads it like any run: 4 requests in flight, one token each per 5 ms step.
    out = tmp_path / "plots"
    res = subprocess.run(
        [sys.executable, "-m", "multitenant.analysis.cli", str(run_dir), "--out", str(out)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    tput = summary["runs"][0]["tenants"]["tiny_llama_cpu"]["throughput_tok_s"]
    assert 200 < tput <= 4 / 0.005, f"4 requests x 1 token / 5 ms at most: {tput:.0f} tok/s"
