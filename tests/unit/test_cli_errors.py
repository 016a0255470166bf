"""mt-run turns the configs Hydra cannot compose into one line naming the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from multitenant.cli import hydra_error_line
from multitenant.config.schema import ExperimentConfig, TenantConfig


def _composition_error(override: str) -> ConfigCompositionException:
    """The exception Hydra raises for ``override``, built as Hydra builds it: OmegaConf's error
    as the cause of Hydra's."""
    cfg = OmegaConf.structured(ExperimentConfig)
    cfg.tenants["a"] = OmegaConf.structured(TenantConfig)
    key, value = override.split("=", 1)
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as cause:
        err = ConfigCompositionException(f"Error merging override {override}")
        err.__cause__ = cause
        return err
    raise AssertionError(f"{override} was accepted")


def test_wrong_type_names_the_field():
    line = hydra_error_line(_composition_error("tenants.a.max_batch=abc"), Path("/c"))
    assert line.startswith("tenants.a.max_batch: Value 'abc' of type 'str' could not be converted to Integer")
    assert "\n" not in line


def test_unknown_key_names_the_closest():
    line = hydra_error_line(_composition_error("tenants.a.maxbatch=3"), Path("/c"))
    assert line == "tenants.a.maxbatch: is not a key of the config schema; did you mean tenants.a.max_batch?"


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            MissingConfigException("Cannot find primary config 'multitenant/nope'", missing_cfg_file="multitenant/nope"),
            "no config 'multitenant/nope' under /c; run mt-run alone to list the experiments",
        ),
        (
            OverrideParseException("split=[1", "no viable alternative at input '[1'"),
            "cannot parse the override 'split=[1': no viable alternative at input '[1'; quote it or fix its syntax",
        ),
    ],
)
def test_missing_config_and_unparsable_override(exc, expected):
    assert hydra_error_line(exc, Path("/c")) == expected


def test_mt_run_alone_says_what_each_experiment_needs() -> None:
    from multitenant.cli_args import usage
    from tests.conftest import CONFIGS

    lines = {line.split()[0]: line for line in usage(CONFIGS).splitlines() if line.startswith("  ")}
    assert lines["solo/tiny_llama"].endswith("runs on a CPU")
    assert lines["multitenant/pair_tiny"].endswith("runs on a CPU")
    assert lines["multitenant/pair_llama1b"].endswith("needs GPU")
    assert lines["multitenant/pair_vllm_llama1b"].endswith("needs GPU, vLLM")
    assert lines["multitenant/pair_openai_tiny"].endswith("needs vLLM"), "a launched vLLM server needs the vLLM stack"


def test_likely_mistakes_are_warned_at_start() -> None:
    from tests.conftest import compose_plain, validate_plain

    fp16 = validate_plain(compose_plain("multitenant/pair_tiny", ["tenants.a.dtype=float16"]))
    assert any("tenants.a.dtype=float16 on the CPU" in w for w in fp16.warnings), fp16.warnings
    assert validate_plain(compose_plain("multitenant/pair_tiny")).warnings == []
