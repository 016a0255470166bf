"""The backends a tenant can name, by ``tenants.<t>.backend``: the one registry.

Each backend declares itself once, as a ``base.Backend`` in its own module: ``hf``
(transformers in our own static-batching engine, ``hf/``), ``vllm`` (vLLM's AsyncLLM in the
tenant process, ``vllm.py``), ``openai`` (a streaming client of an OpenAI-compatible server,
``openai/``). The declarations are light (no torch, vLLM or aiohttp import): validation and
analysis read them freely; the tenant process imports the engine its declaration names
(``Backend.engine``) and nothing else. The engine protocol itself is in ``base.py``.
"""

from __future__ import annotations

from multitenant.backends.base import Backend
from multitenant.backends.hf import HF
from multitenant.backends.openai import OPENAI
from multitenant.backends.vllm import VLLM

BACKENDS: dict[str, Backend] = {b.name: b for b in (HF, VLLM, OPENAI)}
