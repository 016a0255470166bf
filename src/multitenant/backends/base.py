"""The engine protocol every backend speaks, and what a backend declares about itself.

The tenant process (``run/tenant.py``) owns arrivals, stop conditions and the event log; an
engine owns batching and execution::

    engine = factory(ctx)                    # the declaration's engine; nothing loaded yet
    engine.load()                            # model / engine / server up; timed as load_s
    engine.warmup()                          # compile, capture; then warm-up requests: warmup_s
    engine.submit(request)                   # at any time: the request enters the engine's queue
    progress = engine.poll(timeout_s)        # what happened since the last poll, in time order
    engine.cancel(rids)                      # stop these requests (the loop logs them cancelled)
    engine.close()                           # release everything, child processes included

``poll`` returns a ``Progress``: ``now_ns`` and the events (token emissions, completions,
encoder iterations) with ``t_ns <= now_ns``, in time order; an event reported by a later poll
has ``t_ns > now_ns``. So the loop can write ``sent`` at ``now_ns`` and keep the log in time
order whatever the engine does in its own threads. ``poll`` waits at most ``timeout_s`` when
the engine has nothing to report (an engine that computes synchronously, like ``hf``, runs one
step instead). A request that fails is a ``Completion`` with status ``error`` and an error
text; the tenant logs it and keeps serving. An engine that can no longer serve at all (its
server died) raises ``EngineFailed`` from ``poll``.

A backend is one ``Backend`` declaration (its options dataclass, its checks, whether it must load
alone, its secrets, its environment, what a solo baseline must match) in its own module, and one
line in ``backends.BACKENDS``. Its engine is named by an import path, imported only inside the
tenant process: declarations stay light (no torch, no vLLM, no aiohttp), so validation and
analysis read them for free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from multitenant.config.schema import TenantConfig
from multitenant.workload import RequestSpec


class EngineFailed(RuntimeError):
    """The engine cannot serve any more (e.g. its server process died); one line, the cause."""


@dataclass(frozen=True, slots=True)
class Emission:
    """Requests ``rids`` received ``counts`` new tokens at ``t_ns`` (time.monotonic_ns())."""

    t_ns: int
    rids: list[int]
    counts: list[int]


@dataclass(frozen=True, slots=True)
class Completion:
    """Request ``rid`` ended at ``t_ns`` with ``status`` ok | error.

    ``error``: one line, for status error. ``fields``: extra ``done`` fields the backend
    records (schema.DONE_ENGINE_* timestamps, usage_tokens, warning).
    """

    t_ns: int
    rid: int
    status: str
    error: str | None = None
    fields: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Iteration:
    """One forward-only (encoder) iteration over ``batch`` sequences, ended at ``t_ns``."""

    t_ns: int
    batch: int
    dur_ns: int


Event = Emission | Completion | Iteration


@dataclass(slots=True)
class Progress:
    """What an engine did up to ``now_ns``: ``events`` in time order, all with t_ns <= now_ns."""

    now_ns: int
    events: list[Event] = field(default_factory=list)


@dataclass(frozen=True)
class DeviceInfo:
    """The device a tenant's engine runs on, as the tenant reports it in ``ready``.

    ``sms``: multiprocessors the engine sees (under an MPS active-thread cap, the capped count);
    None on the CPU. ``probe_error``: why a probe process could not tell (the run goes on)."""

    device: str
    device_name: str | None
    sms: int | None
    total_memory_bytes: int | None
    probe_error: str | None = None


class Engine(Protocol):
    """What the tenant loop needs from a backend (see the module docstring)."""

    vocab_size: int

    def load(self) -> None: ...

    def warmup(self) -> None: ...

    def submit(self, request: RequestSpec) -> None: ...

    def poll(self, timeout_s: float) -> Progress: ...

    def cancel(self, rids: list[int]) -> None: ...

    def device_info(self) -> DeviceInfo: ...

    def engine_info(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineContext:
    """Everything a tenant process knows when it builds its engine (from its spec.json).

    ``tenant``: the tenant's validated config; ``options``: its backend's options (an instance of
    ``Backend.options``, None for a backend without options); ``device``: ``cpu`` or ``cuda:0``
    (under MPS and timeslice a tenant sees its GPU as device 0); ``tenant_dir``: the tenant's
    folder (server logs, a synthetic model's config.json); ``max_input_len`` /
    ``max_output_len``: the longest prompt and output its workload can produce (sizes static KV
    caches and vLLM's ``max_model_len``); ``pinned_mem_limit_bytes``: the MPS pinned-memory limit
    applied to it (None when none is applied); ``gpu_total_memory_bytes``: the GPU's memory
    (None on the CPU).
    """

    name: str
    tenant: TenantConfig
    options: Any
    device: str
    tenant_dir: Path
    max_input_len: int
    max_output_len: int
    pinned_mem_limit_bytes: int | None = None
    gpu_total_memory_bytes: int | None = None


@dataclass(frozen=True)
class TenantCheck:
    """What a backend's ``validate`` looks at: ``where`` is ``tenants.<name>`` (errors name their
    field below it), ``device_index`` the tenant's GPU (None on the CPU), ``mode`` the run's."""

    where: str
    tenant: TenantConfig
    options: Any
    mode: str
    device_index: int | None


def _never(options: Any) -> bool:
    return False


def _none(options: Any) -> list[str]:
    return []


def _no_env(options: Any, mode: str) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class Backend:
    """One backend, declared in its own module and listed once in ``backends.BACKENDS``.

    - ``engine``: ``"package.module:factory"``, a callable ``(EngineContext) -> Engine``, imported
      in the tenant process only (so its heavy imports never reach mt-run or mt-analyze);
    - ``options``: the dataclass of ``tenants.<t>.<name>`` (Hydra checks keys and types against it
      while composing), None for a backend without options;
    - ``tasks``: the tasks it serves;
    - ``validate``: checks of the tenant run before any process starts; raises ``ConfigError``
      (``config.schema.fail``) naming the field and the fix;
    - ``validate_group``: checks of all this backend's tenants of one run together (vLLM engines
      sharing a GPU must ask for at most all of its memory together);
    - ``loads_alone``: whether its engine sizes itself from the GPU's free memory while it loads
      (vLLM, a launched server): such a tenant starts only once every tenant before it is ready;
    - ``secret_env``: names of environment variables whose values must never stay in a file of
      the run (API keys): redacted from every tenant log at the end;
    - ``env``: variables the tenant process needs, given its options and the run's mode
      (the user's own environment wins where it sets them);
    - ``identity``: the options that change per-token performance, so a solo baseline must have
      the same values (None or ``{}`` means the engine's default, the same as unset).
    """

    name: str
    engine: str
    options: type | None = None
    tasks: tuple[str, ...] = ("generate",)
    validate: Callable[[TenantCheck], None] | None = None
    validate_group: Callable[[list[TenantCheck]], None] | None = None
    loads_alone: Callable[[Any], bool] = _never
    secret_env: Callable[[Any], list[str]] = _none
    env: Callable[[Any, str], dict[str, str]] = _no_env
    identity: tuple[str, ...] = ()

    def identity_of(self, options: Any) -> dict[str, Any]:
        """The ``identity`` options that are set (unset ones are the engine's defaults)."""
        if options is None:
            return {}
        values = {key: getattr(options, key) for key in self.identity}
        return {k: v for k, v in values.items() if v not in (None, {})}
