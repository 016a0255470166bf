"""The ``hf`` backend: transformers models in our own engine (static batching, eager or graphs).

``engine.py`` is the engine, ``batching.py`` its host-side bookkeeping, ``graphs.py`` the
static KV cache and CUDA-graph decode step of ``execution: graphs``. This module is only the
declaration: it imports neither torch nor transformers.
"""

from __future__ import annotations

from multitenant.backends.base import Backend, TenantCheck
from multitenant.config.schema import fail


def validate(c: TenantCheck) -> None:
    """What only this engine cannot do: CUDA graphs without a GPU, or for an encoder's forward."""
    t = c.tenant
    if t.execution == "graphs" and c.device_index is None:
        raise fail(
            f"{c.where}.execution",
            "graphs (CUDA graphs) needs a GPU but this tenant runs on the CPU",
            "use execution=eager on the CPU, or run on a GPU with mode=timeslice or mps",
        )
    if t.task == "forward" and t.execution == "graphs":
        raise fail(
            f"{c.where}.execution", "graphs is for generate tenants", "use execution=eager for task=forward"
        )


HF = Backend(
    name="hf",
    engine="multitenant.backends.hf.engine:build",
    options=None,
    tasks=("generate", "forward"),
    validate=validate,
)
