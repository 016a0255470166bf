"""Where tenants keep compiled kernels: config.resolve_cache_dir and orchestrator.cache_env."""

from __future__ import annotations

from pathlib import Path

import pytest

from multitenant.config.units import resolve_cache_dir
from multitenant.run.environment import CACHE_VARS, cache_env


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MT_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert resolve_cache_dir(None) == (tmp_path / "home" / ".cache" / "multitenant").resolve()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir(None) == (tmp_path / "xdg" / "multitenant").resolve()
    monkeypatch.setenv("MT_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir(None) == (tmp_path / "env").resolve()
    assert resolve_cache_dir(str(tmp_path / "cfg")) == (tmp_path / "cfg").resolve()  # the config wins


def test_cache_env_sets_every_cache_under_the_dir_but_keeps_the_users_own(tmp_path: Path) -> None:
    env = cache_env({}, tmp_path)
    assert env == {var: str(tmp_path / sub) for var, sub in CACHE_VARS.items()}
    assert set(env) == {"TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "VLLM_CACHE_ROOT", "CUDA_CACHE_PATH"}
    kept = cache_env({"TRITON_CACHE_DIR": "/fast/triton"}, tmp_path)
    assert "TRITON_CACHE_DIR" not in kept and kept["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
