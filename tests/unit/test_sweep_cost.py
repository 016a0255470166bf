"""benchmarks/sweep_cost.py's phases from a job folder: tenants that load side by side count
with the slowest, tenants that load one after another (vLLM, launched servers) add up; import
comes from the manifest's import_s, start from the first spawn."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def sweep_cost() -> Any:
    spec = importlib.util.spec_from_file_location("sweep_cost", ROOT / "benchmarks" / "sweep_cost.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


S = 1_000_000_000


def job(tmp: Path, tenants: dict[str, dict[str, Any]], preload: float | None = None) -> Path:
    """A job folder: each tenant spawned at ``spawn`` s, run_start at ``run_start`` s, ready at
    ``ready`` s; window 20-50 s; orchestrator 0-52 s."""
    d = tmp / "job0"
    records = {}
    for name, t in tenants.items():
        tdir = d / "tenants" / name
        tdir.mkdir(parents=True)
        (tdir / "spec.json").write_text(json.dumps({"spawned_ns": t["spawn"] * S}))
        events = [
            {"ev": "run_start", "t": t["run_start"] * S},
            {"ev": "ready", "t": t["ready"] * S, "load_s": t["load"], "warmup_s": t["warmup"]},
        ]
        (tdir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        records[name] = {"backend": t["backend"], "start": "fork", "import_s": t["import"], "load_s": t["load"], "warmup_s": t["warmup"]}
    manifest = {"status": "ok", "overrides": [], "tenant_start": "fork", "zygote_preload_s": preload,
                "started_ns": 0, "ended_ns": 52 * S, "window": {"t0_ns": 20 * S, "t1_ns": 50 * S}, "tenants": records}  # fmt: skip
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_side_by_side_tenants_count_with_the_slowest(tmp_path: Path) -> None:
    d = job(tmp_path, {
        "a": {"backend": "hf", "spawn": 1, "run_start": 1, "ready": 9, "import": 2.0, "load": 3.0, "warmup": 3.0},
        "b": {"backend": "hf", "spawn": 1.5, "run_start": 2, "ready": 10, "import": 1.0, "load": 4.0, "warmup": 2.5},
    }, preload=0.8)  # fmt: skip
    p = sweep_cost().job_phases(d)
    assert not p["sequential"]
    assert (p["start"], p["preload"], p["import"], p["load"], p["warmup"]) == (1.0, 0.8, 2.0, 4.0, 3.0)
    assert (p["lead"], p["window"], p["stop"]) == (10.0, 30.0, 2.0)


def test_tenants_that_load_one_after_another_add_up(tmp_path: Path) -> None:
    # vLLM: b starts once a is ready; load is the engine's start, read from the manifest.
    d = job(tmp_path, {
        "a": {"backend": "vllm", "spawn": 1, "run_start": 1, "ready": 9, "import": 2.0, "load": 5.0, "warmup": 1.0},
        "b": {"backend": "openai", "spawn": 9, "run_start": 9, "ready": 18, "import": 0.5, "load": 7.0, "warmup": 1.5},
    })  # fmt: skip
    p = sweep_cost().job_phases(d)
    assert p["sequential"]
    assert (p["import"], p["load"], p["warmup"], p["lead"]) == (2.5, 12.0, 2.5, 2.0)
    assert [t["backend"] for t in p["tenants"]] == ["vllm", "openai"]
