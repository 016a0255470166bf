"""Reading what an OpenAI-compatible server streams back: tokens per SSE chunk, error texts.

Tokens per chunk, best source first:

1. ``len(choice["token_ids"])`` when the server returns token ids (vLLM with
   ``extra_body: {return_token_ids: true}``; exact, also when one chunk carries several);
2. the increase of ``usage.completion_tokens`` when chunks carry usage
   (``stream_options.continuous_usage_stats``);
3. else 1 per chunk whose choice has text or no ``finish_reason`` (an empty chunk with a
   finish reason is a terminal marker: 0).

The final usage chunk (``stream_options.include_usage``) gives the server's own count
(``StreamCount.usage_tokens``). Chunks and error bodies are the server's JSON, read as such.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

ERROR_TEXT_CHARS = 300


class StreamError(Exception):
    """The server reported an error inside the stream (an ``error`` object in a chunk)."""


def one_line(text: str, limit: int = ERROR_TEXT_CHARS) -> str:
    return " ".join(text.split())[:limit]


def error_message(body: bytes | str) -> str:
    """The message of an error body (OpenAI ``{"error": {"message"}}``, vLLM's older
    ``{"message"}``, FastAPI's ``{"detail"}``, or the raw text), on one line, shortened."""
    raw = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return one_line(raw) or "(empty body)"
    msg: Any = None
    if isinstance(obj, dict):
        err = obj.get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        msg = msg or obj.get("message") or obj.get("detail")
    return one_line(str(msg if msg else raw)) or "(empty body)"


class StreamCount:
    """Token accounting of one streamed completion, fed chunk by chunk (module docstring)."""

    __slots__ = ("streamed", "usage_tokens", "finished", "_cumulative")

    def __init__(self) -> None:
        self.streamed = 0  # tokens the chunks carried
        self.usage_tokens: int | None = None  # the final usage chunk's completion_tokens
        self.finished = False  # a choice had a finish_reason
        self._cumulative = 0  # completion_tokens of the last chunk with usage (continuous stats)

    def feed(self, chunk: dict[str, Any]) -> int:
        """Tokens in this chunk. Raises StreamError if the chunk is an error report."""
        if chunk.get("error") is not None or chunk.get("object") == "error":
            raise StreamError(error_message(orjson.dumps(chunk)))
        choices = chunk.get("choices")
        usage = chunk.get("usage")
        if not choices:
            if usage and usage.get("completion_tokens") is not None:
                self.usage_tokens = int(usage["completion_tokens"])
            return 0
        choice = choices[0]
        ids = choice.get("token_ids")
        if ids is not None:
            n = len(ids)
        elif usage and usage.get("completion_tokens") is not None:
            n = max(0, int(usage["completion_tokens"]) - self._cumulative)
        else:
            n = 1 if choice.get("text") or choice.get("finish_reason") is None else 0
        if usage and usage.get("completion_tokens") is not None:
            self._cumulative = int(usage["completion_tokens"])
        if choice.get("finish_reason") is not None:
            self.finished = True
        self.streamed += n
        return n


def merge_body(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``; a dict in both (``stream_options``) is merged one level deep, so
    adding ``continuous_usage_stats`` keeps ``include_usage``."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def numpy_default(obj: Any) -> Any:
    # orjson serialises contiguous numpy arrays itself and falls back here for the rest.
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} into a request body")


def normalize_url(url: str, endpoint: str) -> str:
    """``url`` without a trailing slash, and without a trailing ``/v1`` when the endpoint
    starts with it (``http://host:8000/v1`` is how OpenAI clients name a server)."""
    url = url.rstrip("/")
    if url.endswith("/v1") and endpoint.startswith("/v1/"):
        url = url[: -len("/v1")]
    return url
