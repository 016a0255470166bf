"""Config validation: every bad value is one ConfigError naming the field and the fix."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from multitenant.config.schema import ConfigError
from multitenant.config.units import parse_pinned_mem_limit
from multitenant.config.validate import apply_split
from tests.conftest import compose_plain, typed
from tests.conftest import validate_plain as validate


@pytest.fixture(scope="module")
def pair() -> dict[str, Any]:
    return compose_plain("multitenant/pair_tiny")


@pytest.fixture(scope="module")
def gpu_pair() -> dict[str, Any]:
    return compose_plain("multitenant/pair_llama1b")


def bad(cfg: dict[str, Any], path: str, value: Any) -> ConfigError:
    cfg = copy.deepcopy(cfg)
    node = cfg
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError) as ei:
        validate(cfg)
    msg = str(ei.value)
    assert "\n" not in msg, "errors are one line"
    assert ";" in msg, "errors say how to fix the problem"
    return ei.value


def test_example_configs_validate(pair: dict[str, Any], gpu_pair: dict[str, Any]) -> None:
    out = validate(copy.deepcopy(pair))
    assert out.tenants["a"].config.device == "cpu"
    out = validate(copy.deepcopy(gpu_pair))
    assert out.tenants["a"].config.device == "cuda:0"


@pytest.mark.parametrize(
    "path,value,field",
    [
        ("tenants.a.model", "synthetic:no-such-arch", "tenants.a.model"),
        ("tenants.a.model", "./no/such/dir", "tenants.a.model"),
        ("tenants.a.backend", "tgi", "tenants.a.backend"),
        ("tenants.a.task", "train", "tenants.a.task"),
        ("tenants.a.execution", "jit", "tenants.a.execution"),
        ("tenants.a.dtype", "int3", "tenants.a.dtype"),
        ("tenants.a.max_batch", 0, "tenants.a.max_batch"),
        ("tenants.a.cpu_threads", 0, "tenants.a.cpu_threads"),
        ("tenants.a.workload.dataset.input_len", 0, "tenants.a.workload.dataset.input_len"),
        ("tenants.a.workload.dataset.output_len", -5, "tenants.a.workload.dataset.output_len"),
        ("tenants.a.workload.dataset.range_ratio", 1.0, "tenants.a.workload.dataset.range_ratio"),
        ("tenants.a.workload.dataset.kind", "sharegpt", "tenants.a.workload.dataset.kind"),
        ("tenants.a.workload.arrival.kind", "burst", "tenants.a.workload.arrival.kind"),
        ("tenants.a.workload.arrival.concurrency", 0, "tenants.a.workload.arrival.concurrency"),
        ("tenants.a.workload.duration_s", -1.0, "tenants.a.workload.duration_s"),
        ("tenants.a.workload.num_requests", 0, "tenants.a.workload.num_requests"),
        ("tenants.a.workload.warmup_requests", -1, "tenants.a.workload.warmup_requests"),
        ("tenants.a.workload.start_delay_s", -0.5, "tenants.a.workload.start_delay_s"),
        ("mode", "mig", "mode"),
        ("ready_timeout_s", 0, "ready_timeout_s"),
        ("telemetry_interval_ms", 1, "telemetry_interval_ms"),
        ("tenant_start", "exec", "tenant_start"),
    ],
)
def test_bad_values_name_the_field(pair: dict[str, Any], path: str, value: Any, field: str) -> None:
    err = bad(pair, path, value)
    assert str(err).startswith(field), str(err)


def test_open_loop_needs_positive_rate(pair: dict[str, Any]) -> None:
    cfg = copy.deepcopy(pair)
    cfg["tenants"]["a"]["workload"]["arrival"].update(kind="poisson", rate=0.0)
    with pytest.raises(ConfigError, match=r"^tenants\.a\.workload\.arrival\.rate"):
        validate(cfg)
    cfg["tenants"]["a"]["workload"]["arrival"].update(kind="gamma", rate=2.0, burstiness=-1.0)
    with pytest.raises(ConfigError, match=r"burstiness"):
        validate(cfg)


def test_a_rate_on_a_closed_loop_is_refused(pair: dict[str, Any]) -> None:
    # It used to be ignored: a rate sweep over a closed-loop tenant ran one point N times.
    cfg = copy.deepcopy(pair)
    cfg["tenants"]["a"]["workload"]["arrival"].update(kind="closed", rate=4.0)
    with pytest.raises(ConfigError, match=r"^tenants\.a\.workload\.arrival\.rate: .*arrival\.kind=poisson"):
        validate(cfg)


def test_trials_and_trial_are_checked(pair: dict[str, Any]) -> None:
    # trials=true never reaches validation: the typed schema refuses a bool for an int.
    for trials, trial, field in ((0, 0, "trials"), (2, 2, "trial"), (3, -1, "trial")):
        cfg = copy.deepcopy(pair)
        cfg.update(trials=trials, trial=trial)
        with pytest.raises(ConfigError, match=rf"^{field}:"):
            validate(cfg)
    cfg = copy.deepcopy(pair)
    cfg.update(trials=3, trial=2, cache_dir="~/mt-cache")
    out = validate(cfg)
    assert out.config.cache_dir == str(Path("~/mt-cache").expanduser().resolve())


def test_tenant_needs_a_stop_condition(pair: dict[str, Any]) -> None:
    cfg = copy.deepcopy(pair)
    cfg["tenants"]["a"]["workload"].update(duration_s=None, num_requests=None)
    with pytest.raises(ConfigError, match="neither num_requests nor duration_s"):
        validate(cfg)


def test_jsonl_dataset_must_exist(pair: dict[str, Any], tmp_path: Any) -> None:
    cfg = copy.deepcopy(pair)
    cfg["tenants"]["a"]["workload"]["dataset"].update(kind="jsonl", path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="does not exist"):
        validate(cfg)


def test_bad_tenant_name(pair: dict[str, Any]) -> None:
    cfg = copy.deepcopy(pair)
    cfg["tenants"]["../evil"] = cfg["tenants"].pop("a")
    with pytest.raises(ConfigError, match="folder name"):
        validate(cfg)


def test_no_tenants(pair: dict[str, Any]) -> None:
    cfg = copy.deepcopy(pair)
    cfg["tenants"] = {}
    with pytest.raises(ConfigError, match="no tenant"):
        validate(cfg)


def test_graphs_refused_on_cpu(pair: dict[str, Any]) -> None:
    err = bad(pair, "tenants.a.execution", "graphs")
    assert "execution=eager" in str(err)


def test_gpu_mode_needs_gpu_device(gpu_pair: dict[str, Any]) -> None:
    bad(gpu_pair, "device", "cpu")
    bad(gpu_pair, "device", "tpu:0")


@pytest.mark.parametrize(
    "path,value",
    [
        ("tenants.a.share.active_thread_pct", 0),
        ("tenants.a.share.active_thread_pct", 101),
        ("tenants.a.share.priority", 2),
        ("tenants.a.share.pinned_mem_limit", "lots"),
        ("tenants.a.share.pinned_mem_limit", "0G"),
    ],
)
def test_share_out_of_range_rejected(gpu_pair: dict[str, Any], path: str, value: Any) -> None:
    bad(gpu_pair, path, value)


def test_share_sum_over_100_is_allowed(gpu_pair: dict[str, Any]) -> None:
    cfg = copy.deepcopy(gpu_pair)
    cfg["tenants"]["a"]["share"]["active_thread_pct"] = 80
    cfg["tenants"]["b"]["share"]["active_thread_pct"] = 80
    out = validate(cfg)
    assert out.share_pct_sum == 160


def test_split_spreads_percentages_in_order(gpu_pair: dict[str, Any]) -> None:
    cfg = copy.deepcopy(gpu_pair)
    cfg["split"] = "70/30"
    out = validate(cfg)
    assert [t.config.share.active_thread_pct for t in out.tenants.values()] == [70, 30]
    for split in ("70", "70/30/10", "a/b"):
        cfg = copy.deepcopy(gpu_pair)
        cfg["split"] = split
        with pytest.raises(ConfigError, match="^split"):
            apply_split(typed(cfg))


@pytest.mark.parametrize(
    "given,dev,expected",
    [("20G", 0, "0=20G"), ("512m", 1, "1=512M"), ("0=20G", 3, "0=20G"), ("1.5GB", 0, "0=1.5G")],
)
def test_pinned_mem_limit_normalised(given: str, dev: int, expected: str) -> None:
    assert parse_pinned_mem_limit(given, dev) == expected


def test_encoder_cannot_generate(pair: dict[str, Any]) -> None:
    cfg = copy.deepcopy(pair)
    cfg["tenants"]["a"]["model"] = "synthetic:bert-base"
    with pytest.raises(ConfigError, match=r"^tenants\.a\.task: .*encoder.*task=forward"):
        validate(cfg)
    cfg["tenants"]["a"]["task"] = "forward"
    validate(cfg)


def test_lengths_must_fit_the_position_table(pair: dict[str, Any]) -> None:
    cfg = copy.deepcopy(pair)
    cfg["tenants"]["a"]["model"] = "synthetic:gpt2"  # 1024 positions
    cfg["tenants"]["a"]["workload"]["dataset"].update(input_len=1000, output_len=100, range_ratio=0.0)
    with pytest.raises(ConfigError, match=r"^tenants\.a\.workload\.dataset: .*1100 tokens.*1024 positions"):
        validate(cfg)


def test_shares_outside_mps_are_named_in_one_warning(pair: dict[str, Any]) -> None:
    cfg = copy.deepcopy(pair)
    assert validate(copy.deepcopy(cfg)).unapplied_shares_warning() is None  # cpu mode, no shares
    cfg["split"] = "70/30"
    warning = validate(copy.deepcopy(cfg)).unapplied_shares_warning()
    assert warning is not None and "\n" not in warning
    assert "a.active_thread_pct=70" in warning and "b.active_thread_pct=30" in warning and "mode=mps" in warning


def test_unknown_keys_are_refused_with_the_closest_key(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_plain("multitenant/pair_tiny", ["+tenants.a.workload.duraton_s=10"])
    with pytest.raises(ConfigError) as ei:
        validate(cfg)
    msg = str(ei.value)
    assert msg.startswith("tenants.a.workload.duraton_s:") and "tenants.a.workload.duration_s" in msg
    cfg = compose_plain("multitenant/pair_tiny", ["+windw_lead_s=1"])
    with pytest.raises(ConfigError, match="did you mean window_lead_s"):
        validate(cfg)
    # Free-form mappings stay free: engine_args and extra_body take any key (vLLM, which the
    # launch command starts, need not be installed for this).
    monkeypatch.setattr("multitenant.backends.launch.module_installed", lambda package: True)
    ok = compose_plain("multitenant/pair_openai_tiny", ["+tenants.a.openai.extra_body.top_k=1"])
    validate(ok)


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"prompt_ids": [1, 2, 3]}\n{"prompt_ids": [4, 5\n', ":2: not JSON"),
        ("\n\n", "no requests"),
        ('{"prompt_ids": [1, 2, 99999999]}\n', "prompt_ids must be non-empty ints in [0, "),
        ('{"prompt": "text"}\n', "no prompt_ids"),
        ('{"prompt_ids": [1], "output_len": 0}\n', "output_len must be >= 1"),
    ],
)
def test_jsonl_dataset_is_read_fully_before_start(pair: dict[str, Any], tmp_path: Any, content: str, needle: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    cfg = copy.deepcopy(pair)
    cfg["tenants"]["a"]["workload"]["dataset"].update(kind="jsonl", path=str(path))
    err = bad(cfg, "tenants.a.workload.dataset.path", str(path))
    assert str(err).startswith("tenants.a.workload.dataset.path:") and needle in str(err)
    path.write_text('{"prompt_ids": [1, 2, 3]}\n')
    validate(copy.deepcopy(cfg))  # a good file passes


def test_a_tenant_spec_can_be_added_from_the_command_line() -> None:
    # The README's form: +tenant@tenants.<name>=<spec in configs/tenant/>.
    cfg = validate(compose_plain("multitenant/pair_tiny", ["+tenant@tenants.c=tiny_llama_cpu", "tenants.c.max_batch=2"]))
    assert list(cfg.tenants) == ["a", "b", "c"]
    assert cfg.tenants["c"].config.model == cfg.tenants["a"].config.model and cfg.tenants["c"].config.max_batch == 2
    solo = validate(compose_plain("solo/tiny_llama", ["+tenant@tenants.extra=tiny_llama_cpu"]))
    assert len(solo.tenants) == 2
