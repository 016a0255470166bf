"""Shared fixtures: the repository root and a Hydra-composed experiment as plain data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def compose_plain(config_name: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose a config from configs/ the way mt-run does, as a plain resolved dict."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from multitenant.config.compose import register_configs

    register_configs()
    with initialize_config_dir(version_base=None, config_dir=str(CONFIGS)):
        cfg = compose(config_name=config_name, overrides=overrides or [])
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    return plain


def typed(plain: dict[str, Any]) -> Any:
    """A plain config as mt-run hands it on: unknown keys refused (ConfigError), then converted
    once into the typed schema (``OmegaConf.to_object``)."""
    from omegaconf import OmegaConf

    from multitenant.config.compose import experiment_schema
    from multitenant.config.validate import unknown_key_error

    schema = experiment_schema()
    if (err := unknown_key_error(plain, schema)) is not None:
        raise err
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), plain))


def validate_plain(plain: dict[str, Any]) -> Any:
    """``config.validate.validate`` of a plain config, the way mt-run reaches it: an Experiment."""
    from multitenant.config.validate import validate

    return validate(typed(plain))


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def mt_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running mt-run in a subprocess from the repository root."""
    env = dict(os.environ)
    env["MT_CONFIG_DIR"] = str(CONFIGS)
    env["PYTHONUNBUFFERED"] = "1"
    env["MT_CACHE_DIR"] = str(tmp_path / "mt-cache")  # compile caches: not in the user's home
    return env
