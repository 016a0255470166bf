"""Tenant engines behind one continuous-batching protocol.

The tenant process (``tenant.py``) owns arrivals, stop conditions and the event log; an engine
owns batching and execution. Every backend speaks the same protocol::

    engine = make_engine(spec, tenant_dir)   # nothing loaded yet
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

Backends: ``hf`` (transformers, our own static-batching engine, ``backends/hf/``), ``vllm``
(vLLM's AsyncLLM in the tenant process, ``vllm.py``), ``openai`` (streaming client of an
OpenAI-compatible server, ``openai.py``, with the server lifecycle in ``server.py``). This
module imports neither torch nor vLLM: ``make_engine`` imports the one backend it builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from multitenant.workload import RequestSpec

BACKENDS = ("hf", "vllm", "openai")


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


class Engine(Protocol):
    """What the tenant loop needs from a backend (see the module docstring)."""

    vocab_size: int

    def load(self) -> None: ...

    def warmup(self) -> None: ...

    def submit(self, request: RequestSpec) -> None: ...

    def poll(self, timeout_s: float) -> Progress: ...

    def cancel(self, rids: list[int]) -> None: ...

    def device_info(self) -> dict[str, Any]: ...

    def engine_info(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def make_engine(spec: dict[str, Any], tenant_dir: Path) -> Engine:
    """The engine of one tenant from its spec (the plain data the orchestrator wrote).

    ``spec["tenant"]`` is the validated tenant config, ``spec["engine_device"]`` the device the
    tenant uses (``cpu`` or ``cuda:0``: under MPS and timeslice a tenant sees its GPU as 0),
    ``tenant_dir`` the tenant's folder (server logs, a synthetic model's config.json).
    """
    backend = spec["tenant"]["backend"]
    if backend == "hf":
        from multitenant.backends.hf import HFEngine

        return HFEngine.from_spec(spec)
    if backend == "vllm":
        from multitenant.backends.vllm import VllmEngine

        return VllmEngine.from_spec(spec, tenant_dir)
    if backend == "openai":
        from multitenant.backends.openai import OpenAIEngine

        return OpenAIEngine.from_spec(spec, tenant_dir)
    raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
