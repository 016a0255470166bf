"""What the orchestrator hands a tenant process: ``tenants/<name>/spec.json``.

Plain data on disk (so a tenant can be started by hand for debugging:
``python -m multitenant.run.tenant --spec tenants/a/spec.json``), typed on both sides. The
engine and the options class are named by import path: the tenant process imports its backend's
engine there, and only there, and needs no registry of its own.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitenant.backends.base import EngineContext
from multitenant.config.schema import TenantConfig


@dataclass
class TenantSpec:
    """One tenant process's instructions.

    ``engine`` / ``options_type``: ``"module:attr"`` of the engine factory and of the options
    dataclass (None: the backend has none); ``options``: the options as plain data;
    ``engine_device``: ``cpu`` or ``cuda:0`` (under MPS and timeslice the tenant's GPU is its
    device 0); ``window_timeout_s``: how long it waits for the window after it is ready
    (tenants that load one after another wait for the others); ``spawned_ns``:
    ``time.monotonic_ns()`` when the orchestrator started (or forked) the process, None when
    started by hand: the tenant reports ``import_s`` from it."""

    name: str
    tenant: TenantConfig
    engine: str
    options_type: str | None
    options: dict[str, Any] | None
    events_path: str
    engine_device: str
    mode: str
    max_input_len: int
    max_output_len: int
    pinned_mem_limit_bytes: int | None
    gpu_total_memory_bytes: int | None
    window_timeout_s: float
    spawned_ns: int | None = None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2), encoding="utf-8")

    @classmethod
    def read(cls, path: str | Path) -> TenantSpec:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        data["tenant"] = _build(TenantConfig, data["tenant"])
        return cls(**data)

    def engine_context(self, tenant_dir: Path) -> EngineContext:
        """The backend's view of this tenant (its options typed again)."""
        options = None
        if self.options_type is not None:
            options = import_path(self.options_type)(**(self.options or {}))
        return EngineContext(
            name=self.name,
            tenant=self.tenant,
            options=options,
            device=self.engine_device,
            tenant_dir=tenant_dir,
            max_input_len=self.max_input_len,
            max_output_len=self.max_output_len,
            pinned_mem_limit_bytes=self.pinned_mem_limit_bytes,
            gpu_total_memory_bytes=self.gpu_total_memory_bytes,
        )


def import_path(path: str) -> Any:
    """The object ``"package.module:attr"`` names."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def type_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def common_fields(tenant: TenantConfig) -> TenantConfig:
    """The tenant's fields of ``TenantConfig`` itself (a composed config also carries every
    backend's options block; the spec carries only its own backend's, as ``options``)."""
    return TenantConfig(**{f.name: getattr(tenant, f.name) for f in dataclasses.fields(TenantConfig)})


def _build(cls: type, data: dict[str, Any]) -> Any:
    """A config dataclass from plain data, nested dataclass fields included."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict):
                value = _build(typing.cast(type, hints[f.name]), value)
            kwargs[f.name] = value
    return cls(**kwargs)
