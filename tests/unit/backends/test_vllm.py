"""The vllm backend's pure parts (engine args, done fields, KV bytes), its declaration's checks,
and the openai declaration's checks. The engine itself runs for real in
tests/integration/test_serving_pairs.py."""

from __future__ import annotations

import dataclasses
import importlib.util
from types import SimpleNamespace
from typing import Any

import pytest

import multitenant.backends.vllm as vllm_mod
from multitenant.backends import BACKENDS
from multitenant.backends.base import TenantCheck
from multitenant.backends.openai import OpenAIOptions
from multitenant.backends.vllm import VllmOptions, engine_args, engine_fields, kv_bytes_per_token
from multitenant.config.schema import ConfigError, ShareConfig, TenantConfig
from multitenant.schema import (
    DONE_ENGINE_FIRST_TOKEN,
    DONE_ENGINE_LAST_TOKEN,
    DONE_ENGINE_QUEUED,
    DONE_ENGINE_SCHEDULED,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def args(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "synthetic": True,
        "dtype": "bfloat16",
        "execution": "graphs",
        "max_batch": 8,
        "max_input_len": 512,
        "max_output_len": 128,
        "options": VllmOptions(),
    }
    base.update(kw)
    return engine_args("/m", **base)


def test_engine_args_map_the_tenant_fields() -> None:
    a = args()
    assert a["model"] == "/m" and a["max_num_seqs"] == 8 and a["dtype"] == "bfloat16"
    assert a["max_model_len"] == 640 and a["enforce_eager"] is False
    assert a["load_format"] == "dummy" and a["skip_tokenizer_init"] is True
    assert "gpu_memory_utilization" not in a
    assert args(execution="eager")["enforce_eager"] is True
    assert "load_format" not in args(synthetic=False)


def test_pinned_limit_sets_memory_share_of_total() -> None:
    # 0.9 x 20 GiB / 80 GiB = 0.225: vLLM's fraction is of the total, the limit is what it gets.
    a = args(pinned_limit_bytes=20 << 30, gpu_total_bytes=80 << 30)
    assert a["gpu_memory_utilization"] == pytest.approx(0.225)
    # An explicit share wins over the rule; engine_args overrides come last.
    b = args(options=VllmOptions(gpu_memory_utilization=0.5, engine_args={"max_model_len": 1024}),
             pinned_limit_bytes=20 << 30, gpu_total_bytes=80 << 30)  # fmt: skip
    assert b["gpu_memory_utilization"] == 0.5 and b["max_model_len"] == 1024


def test_engine_fields_are_integer_ns_and_skip_unset() -> None:
    m = SimpleNamespace(queued_ts=1.5, scheduled_ts=1.500002, first_token_ts=1.6, last_token_ts=0.0)
    f = engine_fields(m)
    assert f == {
        DONE_ENGINE_QUEUED: 1_500_000_000,
        DONE_ENGINE_SCHEDULED: 1_500_002_000,
        DONE_ENGINE_FIRST_TOKEN: 1_600_000_000,
    }
    assert DONE_ENGINE_LAST_TOKEN not in f
    assert engine_fields(None) == {}


def test_kv_bytes_per_token_from_arch() -> None:
    # Llama-3.2-1B: 16 layers x 8 kv heads x head_dim 64 x (K and V) = 16384 elements per token.
    assert kv_bytes_per_token("synthetic:llama-3.2-1b") == 2 * 16 * 8 * 64
    assert kv_bytes_per_token("meta-llama/Llama-3.2-1B") is None


def check(backend: str, options: Any, *, mode: str = "timeslice", name: str = "a", **tenant: Any) -> TenantCheck:
    t = TenantConfig(backend=backend, model="synthetic:tiny-llama", **tenant)
    return TenantCheck(f"tenants.{name}", t, options, mode, None if mode == "cpu" else 0)


def refused(c: TenantCheck) -> str:
    with pytest.raises(ConfigError) as ei:
        validate = BACKENDS[c.tenant.backend].validate
        assert validate is not None
        validate(c)
    msg = str(ei.value)
    assert "\n" not in msg and ";" in msg, "one line that names the fix"
    return msg


def test_vllm_missing_names_the_setup_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_mod, "vllm_installed", lambda: False)
    assert "bash scripts/setup.sh vllm" in refused(check("vllm", VllmOptions()))


def test_vllm_reserved_and_range_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_mod, "vllm_installed", lambda: True)
    assert "max_batch" in refused(check("vllm", VllmOptions(engine_args={"max_num_seqs": 3})))
    assert "gpu_memory_utilization" in refused(check("vllm", VllmOptions(gpu_memory_utilization=1.5)))
    assert "block_size" in refused(check("vllm", VllmOptions(block_size=0)))
    assert "eager" in refused(check("vllm", VllmOptions(), mode="cpu", execution="graphs"))
    vllm_mod.validate(check("vllm", VllmOptions(gpu_memory_utilization=0.4), execution="graphs"))


def test_vllm_memory_shares_must_fit_together() -> None:
    def pair(util: float | None, mode: str = "timeslice", limit: str | None = None) -> list[TenantCheck]:
        share = ShareConfig(pinned_mem_limit=limit)
        return [check("vllm", VllmOptions(gpu_memory_utilization=util), mode=mode, name=n, share=share) for n in "ab"]

    vllm_mod.validate_group(pair(0.3))
    with pytest.raises(ConfigError, match="0.9"):
        vllm_mod.validate_group(pair(None))  # vLLM's 0.9 each
    vllm_mod.validate_group(pair(None, mode="cpu"))  # no GPU to share
    vllm_mod.validate_group(pair(None, mode="mps", limit="0=20G"))  # each asks for a part of its limit


def test_vllm_declaration() -> None:
    vllm = BACKENDS["vllm"]
    assert vllm.loads_alone(VllmOptions())
    assert vllm.env(VllmOptions(), "cpu") == {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    assert vllm.env(VllmOptions(), "mps") == {}
    assert set(vllm.identity) == {f.name for f in dataclasses.fields(VllmOptions)}
    assert vllm.identity_of(VllmOptions(block_size=32)) == {"block_size": 32, "seed": 0}


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="engine_args names come from vLLM's AsyncEngineArgs")
def test_vllm_engine_arg_typo_suggests_the_name() -> None:
    assert "max_num_batched_tokens" in refused(check("vllm", VllmOptions(engine_args={"max_num_batched_token": 64})))


def test_openai_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    good = {"launch": "{python} -m http.server {port}"}
    BACKENDS["openai"].validate(check("openai", OpenAIOptions(**good)))  # type: ignore[misc]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"url": "http://127.0.0.1:8000"}, "exactly one"),
        ({"launch": None, "url": "localhost:8000"}, "http"),
        ({"launch": "no-such-server-xyz --port {port}"}, "not on PATH"),
        ({"launch": "{python} -m http.server --key {api_key}"}, "api_key_env"),
        ({"launch": "{python} -m no_such_module_xyz"}, "install no_such_module_xyz"),
        ({"endpoint": "/v1/chat/completions"}, "completions"),
        ({"api_key_env": "MT_TEST_NO_SUCH_KEY"}, "MT_TEST_NO_SUCH_KEY"),
        ({"port": 70000}, "65535"),
    ]
    monkeypatch.delenv("MT_TEST_NO_SUCH_KEY", raising=False)
    for change, expected in cases:
        assert expected in refused(check("openai", OpenAIOptions(**{**good, **change}))), change


def test_openai_declaration() -> None:
    openai = BACKENDS["openai"]
    assert openai.loads_alone(OpenAIOptions(launch="srv")) and not openai.loads_alone(OpenAIOptions(url="http://x"))
    assert openai.secret_env(OpenAIOptions(api_key_env="MY_KEY")) == ["MY_KEY"] and openai.secret_env(OpenAIOptions()) == []
    assert openai.identity_of(OpenAIOptions(url="http://x", port=9000)) == {
        "url": "http://x", "endpoint": "/v1/completions", "ignore_eos": True,
    }  # fmt: skip


def test_hf_checks() -> None:
    assert "GPU" in refused(check("hf", None, mode="cpu", execution="graphs"))
    assert "generate" in refused(check("hf", None, task="forward", execution="graphs"))
    assert BACKENDS["hf"].tasks == ("generate", "forward") and BACKENDS["hf"].options is None
