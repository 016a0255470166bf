"""The contract's base: schema versions, event kinds, status constants, and plain data <->
dataclasses (``from_dict``, ``to_dict``).

Statuses are named constants of their JSON text (``RunStatus.OK == "ok"``): plain strings, so
numpy columns, f-strings and files written by older versions need no conversion.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Final, TypeVar

# Version of the event log (``run_start.schema``) and of manifest.json (``schema_version``).
EVENT_SCHEMA_VERSION = 1
MANIFEST_SCHEMA_VERSION = 1
# Version of mt-analyze's summary.json (``schema_version`` at its top).
SUMMARY_SCHEMA_VERSION = 1

# Event kinds of schema v1, in the order a request normally produces them.
EV_RUN_START = "run_start"
EV_READY = "ready"
EV_WINDOW = "window"
EV_SCHED = "sched"
EV_SENT = "sent"
EV_TOK = "tok"
EV_DONE = "done"
EV_ITER = "iter"
EV_RUN_END = "run_end"
EVENT_KINDS = (EV_RUN_START, EV_READY, EV_WINDOW, EV_SCHED, EV_SENT, EV_TOK, EV_DONE, EV_ITER, EV_RUN_END)


class RequestStatus:
    """``done.status``: how one request ended."""

    OK: Final = "ok"
    ERROR: Final = "error"
    CANCELLED: Final = "cancelled"
    ALL: Final = (OK, ERROR, CANCELLED)


class TenantStatus:
    """``run_end.status`` and the ``finished`` message: how a tenant process ended."""

    OK: Final = "ok"
    ERROR: Final = "error"
    INTERRUPTED: Final = "interrupted"
    ALL: Final = (OK, ERROR, INTERRUPTED)


class RunStatus:
    """``manifest.json`` ``status``: how a run ended (``running`` while it runs, or when mt-run
    was killed before it could say)."""

    RUNNING: Final = "running"
    OK: Final = "ok"
    FAILED: Final = "failed"
    INTERRUPTED: Final = "interrupted"
    ALL: Final = (RUNNING, OK, FAILED, INTERRUPTED)


# Optional `done` fields a serving engine adds (vLLM): its own per-request timestamps, integer
# ns of the engine core's CLOCK_MONOTONIC, the same host clock as `t`. With `sent` and the first
# `tok` they split TTFT into front-end delay, engine queueing and prefill (docs/analysis.md).
DONE_ENGINE_QUEUED = "engine_queued_ns"  # the engine core put the request in its waiting queue
DONE_ENGINE_SCHEDULED = "engine_scheduled_ns"  # first scheduled (its prefill starts)
DONE_ENGINE_FIRST_TOKEN = "engine_first_tok_ns"  # the engine core produced its first token
DONE_ENGINE_LAST_TOKEN = "engine_last_tok_ns"  # ... and its last
DONE_ENGINE_FIELDS = (DONE_ENGINE_QUEUED, DONE_ENGINE_SCHEDULED, DONE_ENGINE_FIRST_TOKEN, DONE_ENGINE_LAST_TOKEN)
# Optional `done` fields of the `openai` backend: the server's own token count (`usage`) and a
# one-line warning when it disagrees with the tokens counted in the stream.
DONE_USAGE_TOKENS = "usage_tokens"
DONE_WARNING = "warning"


# ---------------------------------------------------------------------------------------------
# Plain data <-> dataclasses

T = TypeVar("T")


def from_dict(cls: type[T], data: Any) -> T:
    """An instance of the dataclass ``cls`` from plain JSON/YAML data: keys it does not know are
    ignored (a newer writer), keys it lacks take their defaults (an older writer); fields typed as
    a dataclass, ``X | None``, ``list[X]`` or ``dict[str, X]`` of one are converted too."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name])
    return cls(**kwargs)


def _convert(hint: Any, value: Any) -> Any:
    """``value`` as the field type ``hint`` needs it (dataclasses built, the rest as it is)."""
    if value is None:
        return None
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return from_dict(hint, value)
    args = typing.get_args(hint)
    inner = args[-1] if typing.get_origin(hint) in (dict, list) and args else None
    if isinstance(inner, type) and dataclasses.is_dataclass(inner):
        if isinstance(value, dict):
            return {str(k): from_dict(inner, v) for k, v in value.items()}
        return [from_dict(inner, v) for v in value]
    for arg in args:  # X | None
        if dataclasses.is_dataclass(arg) and isinstance(arg, type) and isinstance(value, dict):
            return from_dict(arg, value)
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain JSON data of a dataclass (enums as their text)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))
