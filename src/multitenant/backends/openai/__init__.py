"""The ``openai`` backend: a streaming client of an OpenAI-compatible completions server.

``engine.py`` is the client, ``sse.py`` its reading of the stream, ``backends/server.py`` and
``backends/launch.py`` the lifecycle of a server the tenant launches. This module is only the
declaration (options, checks, secrets): it imports no aiohttp.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from multitenant.backends.base import Backend, TenantCheck
from multitenant.backends.checks import positive
from multitenant.backends.launch import VLLM_CPU_ENV, check_launch_command
from multitenant.config.schema import ConfigError, fail


@dataclass
class OpenAIOptions:
    """An ``openai`` tenant: a streaming client of an OpenAI-compatible server.

    Either ``url`` of a running server (never started or stopped by the harness) or ``launch``,
    a command line the tenant starts on a free 127.0.0.1 port under its own MPS environment and
    stops at the end. Placeholders in ``launch``: ``{port}``, ``{host}``, ``{model}`` (a local
    model folder; for ``synthetic:<arch>`` one holding only its config.json), ``{python}`` (this
    Python), ``{api_key}`` (the value of ``api_key_env``, never written to a file). Without
    ``{port}``, ``--host 127.0.0.1 --port <port>`` is appended (vLLM, SGLang, llama.cpp).

    The key: a vLLM server (``vllm serve``, ``-m vllm.entrypoints.openai.api_server``) gets it in
    ``VLLM_API_KEY``, out of its command line (``--api-key {api_key}`` may be left out or is
    dropped). For other servers ``{api_key}`` in ``launch`` is the fallback: it puts the key in
    the server's argv, which every user of the machine sees in ``ps`` while it runs.
    """

    url: str | None = None
    launch: str | None = None
    port: int | None = None  # preferred port for launch; a busy one is replaced by a free one
    endpoint: str = "/v1/completions"
    model_name: str | None = None  # the request's "model"; default: the first id of /v1/models
    api_key_env: str | None = None  # name of the environment variable holding the API key
    health_path: str | None = None  # default: /health, else /v1/models
    health_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    ignore_eos: bool = True  # send ignore_eos and min_tokens = max_tokens (vLLM, SGLang)
    vocab_size: int | None = None  # token ids are drawn below it; default: the model's config
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request body


def validate(c: TenantCheck) -> None:
    """One server (url or launch) that can be reached or started, a completions endpoint, a key
    that is set."""
    w, o = c.where, c.options
    if (o.url is None) == (o.launch is None):
        raise fail(
            f"{w}.openai",
            "give exactly one of url (a running server) and launch (a command the harness starts)",
            "set openai.url=http://host:port or openai.launch='vllm serve {model} ...'",
        )
    if o.url is not None and not re.match(r"^https?://[^/\s]+", o.url):
        raise fail(
            f"{w}.openai.url", f"{o.url!r} is not an http(s) URL", "write it like http://127.0.0.1:8000"
        )
    if o.launch is not None and (problem := check_launch_command(o.launch)) is not None:
        raise ConfigError(f"{w}.openai.launch: {problem}")  # the problem names its own fix
    if o.launch is not None and "{api_key}" in o.launch and o.api_key_env is None:
        raise fail(
            f"{w}.openai.launch",
            "uses {api_key} but openai.api_key_env is not set",
            "set openai.api_key_env to the name of the variable that holds the key",
        )
    endpoint = str(o.endpoint)
    # The client sends a completions body (token-id prompt); chat endpoints take messages.
    if not endpoint.startswith("/") or not endpoint.endswith("/completions") or "chat" in endpoint:
        raise fail(
            f"{w}.openai.endpoint",
            f"{endpoint!r} is not a completions path (the client sends token-id prompts)",
            "use /v1/completions",
        )
    if o.port is not None and not 1 <= o.port <= 65535:
        raise fail(f"{w}.openai.port", f"must be 1..65535 (got {o.port})", "pick a port or leave it unset")
    if o.api_key_env is not None and not os.environ.get(o.api_key_env):
        raise fail(
            f"{w}.openai.api_key_env",
            f"environment variable {o.api_key_env} is not set",
            f"export {o.api_key_env}=<key> before mt-run (the key itself is never written anywhere)",
        )
    for key in ("health_timeout_s", "request_timeout_s"):
        positive(f"{w}.openai.{key}", getattr(o, key), key)
    positive(f"{w}.openai.vocab_size", o.vocab_size, "vocab_size", allow_none=True)


def _launches(options: Any) -> bool:
    # A launched server (vLLM's above all) sizes itself from the memory free while it loads.
    return options is not None and options.launch is not None


def _server_env(options: Any, mode: str) -> dict[str, str]:
    # A server launched on the CPU is most often vllm-cpu (the variables mean nothing to others).
    return dict(VLLM_CPU_ENV) if mode == "cpu" and _launches(options) else {}


def _api_key(options: Any) -> list[str]:
    return [options.api_key_env] if options is not None and options.api_key_env else []


OPENAI = Backend(
    name="openai",
    engine="multitenant.backends.openai.engine:build",
    options=OpenAIOptions,
    tasks=("generate",),
    validate=validate,
    loads_alone=_launches,
    secret_env=_api_key,
    env=_server_env,
    # What decides which server runs and what each request asks of it; ports, timeouts and the
    # key's name do not change per-token performance.
    identity=("url", "launch", "endpoint", "model_name", "ignore_eos", "extra_body"),
)
