"""A backend defined outside src/: a scripted token source, to prove that adding a backend is
one file plus one line (``BACKENDS["scripted"] = SCRIPTED``).

The engine is real in every way the harness sees: continuous batching of up to ``max_batch``
requests, one token per running request every ``step_ms`` (a sleep stands in for the model
step), completions when a request has its ``n_out`` tokens, cancellation. Its options block is
``tenants.<t>.scripted`` (``step_ms``), composed and type-checked by Hydra from the declaration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from multitenant.backends.base import (
    Backend,
    Completion,
    DeviceInfo,
    Emission,
    EngineContext,
    Progress,
    TenantCheck,
)
from multitenant.config.schema import fail
from multitenant.schema import RequestStatus
from multitenant.workload import RequestSpec


@dataclass
class ScriptedOptions:
    step_ms: float = 2.0  # one decode step of every running request takes this long


def validate(check: TenantCheck) -> None:
    if not check.options.step_ms > 0:
        raise fail(f"{check.where}.scripted.step_ms", f"must be > 0 (got {check.options.step_ms})", "use e.g. 2.0")


class ScriptedEngine:
    """Continuous batching over a scripted step: every running request gets one token a step."""

    def __init__(self, ctx: EngineContext) -> None:
        self.step_s = ctx.options.step_ms / 1000.0
        self.max_batch = ctx.tenant.max_batch
        self.vocab_size = 1000
        self._waiting: list[RequestSpec] = []
        self._running: dict[int, list[int]] = {}  # rid -> [tokens received, tokens wanted]

    def load(self) -> None:
        pass

    def warmup(self) -> None:
        pass

    def submit(self, request: RequestSpec) -> None:
        self._waiting.append(request)

    def poll(self, timeout_s: float) -> Progress:
        while self._waiting and len(self._running) < self.max_batch:
            r = self._waiting.pop(0)
            self._running[r.rid] = [0, r.n_out]
        if not self._running:
            time.sleep(timeout_s)
            return Progress(time.monotonic_ns())
        time.sleep(self.step_s)
        t = time.monotonic_ns()
        rids = list(self._running)
        events: list[Emission | Completion] = [Emission(t, rids, [1] * len(rids))]
        for rid in rids:
            got = self._running[rid]
            got[0] += 1
            if got[0] >= got[1]:
                del self._running[rid]
                events.append(Completion(t, rid, RequestStatus.OK))
        return Progress(t, list(events))

    def cancel(self, rids: list[int]) -> None:
        for rid in rids:
            self._running.pop(rid, None)
        self._waiting = [r for r in self._waiting if r.rid not in set(rids)]

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(device="cpu", device_name="scripted", sms=None, total_memory_bytes=None)

    def engine_info(self) -> dict[str, object]:
        return {"engine": "scripted", "step_ms": self.step_s * 1000.0}

    def close(self) -> None:
        self._running.clear()


def build(ctx: EngineContext) -> ScriptedEngine:
    return ScriptedEngine(ctx)


SCRIPTED = Backend(
    name="scripted",
    engine="tests.backends.scripted:build",
    options=ScriptedOptions,
    validate=validate,
    identity=("step_ms",),
)
