"""The vllm backend's pure parts (engine args, done fields, KV bytes) and the vllm:/openai:
config blocks. The engine itself runs for real in tests/integration/test_serving_pairs.py."""

from __future__ import annotations

import copy
import importlib.util
from types import SimpleNamespace
from typing import Any

import pytest

import multitenant.config.validate as config_mod
from multitenant.backends.vllm import engine_args, engine_fields, kv_bytes_per_token
from multitenant.config import ConfigError, validate
from multitenant.schema import (
    DONE_ENGINE_FIRST_TOKEN,
    DONE_ENGINE_LAST_TOKEN,
    DONE_ENGINE_QUEUED,
    DONE_ENGINE_SCHEDULED,
)
from tests.conftest import compose_plain

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def args(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "synthetic": True,
        "dtype": "bfloat16",
        "execution": "graphs",
        "max_batch": 8,
        "max_input_len": 512,
        "max_output_len": 128,
        "options": {},
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
    b = args(options={"gpu_memory_utilization": 0.5, "engine_args": {"max_model_len": 1024}},
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


@pytest.fixture
def vllm_pair() -> dict[str, Any]:
    return compose_plain("multitenant/pair_vllm_tiny")


@pytest.fixture
def openai_pair() -> dict[str, Any]:
    return compose_plain("multitenant/pair_openai_tiny")


def refused(cfg: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as ei:
        validate(copy.deepcopy(cfg))
    msg = str(ei.value)
    assert "\n" not in msg and ";" in msg, "one line that names the fix"
    return msg


def test_vllm_missing_names_the_setup_command(vllm_pair: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_mod, "vllm_installed", lambda: False)
    assert "bash scripts/setup.sh vllm" in refused(vllm_pair)


def test_vllm_reserved_and_range_checks(vllm_pair: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_mod, "vllm_installed", lambda: True)
    cfg = copy.deepcopy(vllm_pair)
    cfg["tenants"]["a"]["vllm"]["engine_args"] = {"max_num_seqs": 3}
    assert "max_batch" in refused(cfg)
    cfg = copy.deepcopy(vllm_pair)
    cfg["tenants"]["a"]["vllm"]["gpu_memory_utilization"] = 1.5
    assert "gpu_memory_utilization" in refused(cfg)
    cfg = copy.deepcopy(vllm_pair)
    cfg["tenants"]["a"]["execution"] = "graphs"
    assert "eager" in refused(cfg)


def test_vllm_memory_shares_must_fit_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_mod, "vllm_installed", lambda: True)
    cfg = compose_plain("multitenant/pair_vllm_llama1b")
    validate(copy.deepcopy(cfg))  # 0.3 + 0.3
    for t in cfg["tenants"].values():
        t["vllm"]["gpu_memory_utilization"] = None  # vLLM's 0.9 each
    assert "0.9" in refused(cfg)


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="engine_args names come from vLLM's AsyncEngineArgs")
def test_vllm_engine_arg_typo_suggests_the_name(vllm_pair: dict[str, Any]) -> None:
    cfg = copy.deepcopy(vllm_pair)
    cfg["tenants"]["a"]["vllm"]["engine_args"] = {"max_num_batched_token": 64}
    assert "max_num_batched_tokens" in refused(cfg)


def test_openai_blocks(openai_pair: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    validate(copy.deepcopy(openai_pair))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"url": "http://127.0.0.1:8000"}, "exactly one"),
        ({"launch": None, "url": "localhost:8000"}, "http"),
        ({"launch": "no-such-server-xyz --port {port}"}, "not on PATH"),
        ({"launch": "{python} -m srv --key {api_key}"}, "api_key_env"),
        ({"endpoint": "/v1/chat/completions"}, "completions"),
        ({"api_key_env": "MT_TEST_NO_SUCH_KEY"}, "MT_TEST_NO_SUCH_KEY"),
    ]
    monkeypatch.delenv("MT_TEST_NO_SUCH_KEY", raising=False)
    for change, expected in cases:
        cfg = copy.deepcopy(openai_pair)
        cfg["tenants"]["a"]["openai"].update(change)
        assert expected in refused(cfg), change
