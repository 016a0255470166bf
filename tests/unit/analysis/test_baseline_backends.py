"""Solo baselines match a tenant only when its backend options match too (``tenant_spec``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from multitenant.analysis.baselines import apply_baselines, choose_baseline, describe_spec, tenant_spec
from multitenant.analysis.load import RunData, load_run
from multitenant.analysis.metrics import compute_run
from tests.unit.analysis.builders import RunBuilder, default_workload

# config.resolved.yaml's blocks as config.py writes them (every field, defaults included).
VLLM: dict[str, Any] = {
    "gpu_memory_utilization": None, "kv_cache_memory_bytes": 2**30, "max_model_len": 2048,
    "max_num_batched_tokens": None, "enable_prefix_caching": None, "enable_chunked_prefill": None,
    "block_size": None, "seed": 0, "engine_args": {},
}  # fmt: skip
OPENAI: dict[str, Any] = {
    "url": None, "launch": "vllm serve {model} --max-num-seqs 8", "port": 8001, "endpoint": "/v1/completions",
    "model_name": None, "api_key_env": None, "health_path": None, "health_timeout_s": 600.0,
    "request_timeout_s": 600.0, "ignore_eos": True, "vocab_size": None, "extra_body": {},
}  # fmt: skip


def with_(block: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(block)
    out.update(changes)
    return out


def pair(root: Path, **tenant: Any) -> RunData:
    """A two-tenant run: x (given options) and y (plain hf)."""
    rb = RunBuilder(root, "pair")
    rb.tenant("x", **tenant).start(0).window(1000, 2000)
    rb.tenant("y").start(0).window(1000, 2000)
    return load_run(rb.write())


def solo(root: Path, dirname: str, **tenant: Any) -> RunData:
    rb = RunBuilder(root, dirname)
    rb.tenant("a", **tenant).start(0).window(1000, 2000).request(1, 1000, 1000, [1100, 1200])
    return load_run(rb.write())


def matched(co: RunData, candidate: RunData) -> bool:
    return choose_baseline(co, "x", [candidate]) is not None


def test_vllm_tenant_does_not_match_solo_with_other_kv_cache_bytes(tmp_path: Path) -> None:
    co = pair(tmp_path, backend="vllm", vllm=VLLM)
    other = solo(tmp_path, "solo", backend="vllm", vllm=with_(VLLM, kv_cache_memory_bytes=2**31))
    assert not matched(co, other), f"matched despite kv_cache_memory_bytes {2**30} vs {2**31}"


def test_vllm_tenant_matches_solo_with_equal_vllm_block(tmp_path: Path) -> None:
    co = pair(tmp_path, backend="vllm", vllm=VLLM)
    same = solo(tmp_path, "solo", backend="vllm", vllm=copy.deepcopy(VLLM))
    assert matched(co, same), f"{tenant_spec(co, 'x')} != {tenant_spec(same, 'a')}"


def test_vllm_engine_args_are_part_of_the_spec(tmp_path: Path) -> None:
    co = pair(tmp_path, backend="vllm", vllm=with_(VLLM, engine_args={"max_num_partial_prefills": 2}))
    plain = solo(tmp_path, "solo", backend="vllm", vllm=VLLM)
    assert not matched(co, plain), "matched despite different engine_args"


def test_vllm_unset_option_matches_a_block_without_that_key(tmp_path: Path) -> None:
    # null is the engine's default, the same as a key an older config did not write.
    co = pair(tmp_path, backend="vllm", vllm=VLLM)
    older = {k: v for k, v in VLLM.items() if v is not None and k != "engine_args"}
    assert matched(co, solo(tmp_path, "solo", backend="vllm", vllm=older)), tenant_spec(co, "x")


def test_openai_tenants_differing_only_in_port_or_api_key_env_match(tmp_path: Path) -> None:
    co = pair(tmp_path, backend="openai", openai=OPENAI)
    # Neither changes what the server does: where it listens, which variable holds the key, and
    # the client's timeouts, health path and vocabulary bound.
    other = with_(OPENAI, port=9000, api_key_env="MY_KEY", health_path="/v1/models", health_timeout_s=60.0,
                  request_timeout_s=30.0, vocab_size=32000)  # fmt: skip
    cand = solo(tmp_path, "solo", backend="openai", openai=other)
    assert matched(co, cand), f"{tenant_spec(co, 'x')} != {tenant_spec(cand, 'a')}"


def test_openai_tenants_differing_in_launch_command_do_not_match(tmp_path: Path) -> None:
    co = pair(tmp_path, backend="openai", openai=OPENAI)
    other = solo(tmp_path, "solo", backend="openai", openai=with_(OPENAI, launch="vllm serve {model} --max-num-seqs 64"))
    assert not matched(co, other), "matched despite another launch command"


def test_openai_tenants_differing_in_extra_body_do_not_match(tmp_path: Path) -> None:
    co = pair(tmp_path, backend="openai", openai=OPENAI)
    other = solo(tmp_path, "solo", backend="openai", openai=with_(OPENAI, extra_body={"temperature": 0.7}))
    assert not matched(co, other), "matched despite another extra_body"


def test_hf_spec_keeps_exactly_its_old_keys(tmp_path: Path) -> None:
    # An hf tenant whose config also carries (unused) vllm and openai blocks, as config.py now writes.
    co = pair(tmp_path, vllm=VLLM, openai=OPENAI, workload=default_workload(start_delay_s=0.5))
    # The workload's dataset lengths and arrival process only (schema.WORKLOAD_IDENTITY).
    workload = {
        "dataset": {"kind": "random", "input_len": 16, "output_len": 4, "range_ratio": 0.0, "path": None},
        "arrival": {"kind": "closed", "concurrency": 1, "rate": None, "burstiness": 1.0},
    }
    expected = {
        "model": "synthetic:llama-tiny", "backend": "hf", "execution": "eager", "dtype": "float32",
        "task": "generate", "max_batch": 8, "workload": workload,
        "cpu_threads": None,  # a CPU run: its thread count (absent from this config) is part of it
    }  # fmt: skip
    assert tenant_spec(co, "x") == expected, tenant_spec(co, "x")


def test_hf_tenant_matches_old_solo_run_without_backend_blocks(tmp_path: Path) -> None:
    co = pair(tmp_path, vllm=VLLM, openai=OPENAI)
    old = solo(tmp_path, "solo")  # written before the vllm/openai blocks existed
    assert matched(co, old), f"{tenant_spec(co, 'x')} != {tenant_spec(old, 'a')}"


def test_hf_tenant_ignores_its_unused_vllm_block(tmp_path: Path) -> None:
    co = pair(tmp_path, vllm=VLLM)
    other = solo(tmp_path, "solo", vllm=with_(VLLM, kv_cache_memory_bytes=2**31))
    assert matched(co, other), "an hf tenant's unused vllm block must not change its spec"


def test_missing_baseline_message_names_the_backend_options(tmp_path: Path) -> None:
    co = pair(tmp_path, backend="vllm", vllm=VLLM)
    rm = compute_run(co)
    apply_baselines(rm, {})
    (message,) = [m for m in rm.missing_baselines if "tenant x" in m]
    assert "vllm(kv_cache_memory_bytes=1073741824, max_model_len=2048, seed=0)" in message, message
    assert "--baseline" in message, message


def test_describe_spec_of_openai_shows_the_options_that_matter(tmp_path: Path) -> None:
    co = pair(tmp_path, backend="openai", openai=OPENAI)
    text = describe_spec(tenant_spec(co, "x"), None)
    assert "openai(launch='vllm serve {model} --max-num-seqs 8', endpoint='/v1/completions', ignore_eos=True)" in text, text
    assert "port" not in text and text.endswith("on no GPU"), text


def test_cpu_baselines_match_on_threads(tmp_path: Path) -> None:
    co = pair(tmp_path, cpu_threads=1)
    assert not matched(co, solo(tmp_path, "solo2", cpu_threads=2)), "a 2-thread solo is no baseline of a 1-thread tenant"
    assert matched(co, solo(tmp_path, "solo1", cpu_threads=1))
    assert "cpu_threads=1" in describe_spec(tenant_spec(co, "x"), None)


def capped_solo(root: Path, dirname: str, pct: int | None) -> RunData:
    """A solo run whose tenant ran under an applied MPS cap of ``pct`` % (None: no cap)."""
    rb = RunBuilder(root, dirname)
    rb.tenant("a").start(0).window(1000, 2000).request(1, 1000, 1000, [1100, 1200])
    run_dir = rb.write()
    return load_run(_capped(run_dir, "a", pct) if pct is not None else run_dir)


def test_a_solo_under_an_sm_cap_is_the_baseline_of_the_same_cap_only(tmp_path: Path) -> None:
    # A solo share sweep (what --predict reads) sits beside the runs: its 25 % point measured a
    # share, not the tenant alone, and NP of an uncapped tenant must not divide by it.
    co = pair(tmp_path)
    assert not matched(co, capped_solo(tmp_path, "solo25", 25)), "a 25 % solo was taken as the baseline"
    assert matched(co, capped_solo(tmp_path, "solo100", 100))
    assert matched(co, capped_solo(tmp_path, "solo_uncapped", None))
    co25 = load_run(_capped(pair_dir(tmp_path, "pair25"), "x", 25))
    assert matched(co25, capped_solo(tmp_path, "solo25b", 25)), "the same cap: a baseline"


def pair_dir(root: Path, dirname: str) -> Path:
    rb = RunBuilder(root, dirname)
    rb.tenant("x").start(0).window(1000, 2000)
    rb.tenant("y").start(0).window(1000, 2000)
    return rb.write()


def _capped(run_dir: Path, tenant: str, pct: int) -> Path:
    import json

    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["tenants"][tenant].update(share_applied=True, share={"active_thread_pct": pct})
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return run_dir
