"""The ``hf`` backend: transformers models in our own engine (static batching, eager or graphs).

``engine.py`` is the engine, ``batching.py`` its host-side bookkeeping, ``graphs.py`` the
static KV cache and CUDA-graph decode step of ``execution: graphs``.
"""

from multitenant.backends.hf.engine import HFEngine

__all__ = ["HFEngine"]
