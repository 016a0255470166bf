"""The run <-> analysis contract: event kinds, statuses and schema versions.

Imported by both sides (``events``/``tenant``/``orchestrator`` write what it names,
``analysis`` reads it), and by nothing else; it imports nothing, so analysis stays free of
torch and vLLM. DESIGN.md ("Event log, schema v1") and docs/INTERFACES.md describe the fields.
"""

from __future__ import annotations

# Version of the event log (``run_start.schema``) and of manifest.json (``schema_version``).
EVENT_SCHEMA_VERSION = 1
MANIFEST_SCHEMA_VERSION = 1

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

# `done.status`: how one request ended.
STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_CANCELLED = "cancelled"
REQUEST_STATUSES = (STATUS_OK, STATUS_ERROR, STATUS_CANCELLED)

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

# `run_end.status`: how a tenant process ended.
TENANT_OK = "ok"
TENANT_ERROR = "error"
TENANT_INTERRUPTED = "interrupted"

# `manifest.json` "status": how a run ended (``running`` while it runs).
RUN_RUNNING = "running"
RUN_OK = "ok"
RUN_FAILED = "failed"
RUN_INTERRUPTED = "interrupted"
RUN_STATUSES = (RUN_RUNNING, RUN_OK, RUN_FAILED, RUN_INTERRUPTED)
