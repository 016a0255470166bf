"""The ``openai`` backend: a streaming client of an OpenAI-compatible completions server.

The server is either one the tenant launches (``openai.launch``, see ``server.py``: it runs
in the tenant's process group, under the tenant's MPS share, and is stopped at the end) or a
running one at ``openai.url`` that the harness never starts or stops.

Requests are token-id prompts POSTed to ``<base_url><endpoint>`` (``/v1/completions``) with
``stream: true``; each SSE chunk that carries tokens becomes an ``Emission`` stamped with
``time.monotonic_ns()`` when the client received it. Tokens per chunk, best source first:

1. ``len(choice["token_ids"])`` when the server returns token ids (vLLM with
   ``extra_body: {return_token_ids: true}``; exact, also when one chunk carries several);
2. the increase of ``usage.completion_tokens`` when chunks carry usage
   (``stream_options.continuous_usage_stats``);
3. else 1 per chunk whose choice has text or no ``finish_reason`` (an empty chunk with a
   finish reason is a terminal marker: 0).

The final usage chunk (``stream_options.include_usage``) gives the server's own count,
recorded in ``done`` as ``usage_tokens``. When it exceeds what the stream carried (rule 3 on a
server that packs tokens, or vLLM without a tokenizer, whose last token comes in an empty-text
chunk with the finish reason), the missing tokens are emitted when the usage chunk arrives, so
``n_out`` is the server's count; any disagreement also puts a one-line ``warning`` in ``done``.

Failures: a request the server rejects or breaks off (HTTP error, an ``error`` chunk, a dropped
connection) is a ``Completion`` with status error, and the tenant goes on. A launched server
that has died, or whose health check no longer answers 200 after such a failure (vLLM once
its engine core died), makes ``poll`` raise EngineFailed instead, before the errors it caused.

Threads: an asyncio loop in a background thread runs one aiohttp session; ``submit`` and
``cancel`` hand work to it with ``call_soon_threadsafe``. Everything it reports goes through one
lock: the receiving side stamps the time and appends under it, ``poll`` takes ``now_ns`` and
drains under it, which is the ordering ``Progress`` promises.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from multitenant.backends import Completion, Emission, EngineFailed, Event, Progress, probe
from multitenant.backends.server import LaunchedServer, ServerError, http_get, wait_healthy
from multitenant.config import OpenAIOptions
from multitenant.models import SYNTHETIC_PREFIX, model_vocab_size, synthetic_model_dir
from multitenant.schema import DONE_USAGE_TOKENS, DONE_WARNING, STATUS_ERROR, STATUS_OK
from multitenant.workload import RequestSpec

SERVER_CHECK_INTERVAL_NS = 50_000_000  # poll checks the launched server's process this often
DEATH_GRACE_S = 1.0  # a dropped stream waits this long for a dying server to be reaped
HEALTH_CHECK_TIMEOUT_S = 5.0  # after a server-side error: is the server still healthy?
MAX_LINE_BYTES = 64 << 20  # one SSE line; vLLM's first chunk repeats the prompt's token ids
ERROR_TEXT_CHARS = 300
INFO_TIMEOUT_S = 10.0  # GET /v1/models, /version after the server is healthy


class StreamError(Exception):
    """The server reported an error inside the stream (an ``error`` object in a chunk)."""


def _one_line(text: str, limit: int = ERROR_TEXT_CHARS) -> str:
    return " ".join(text.split())[:limit]


def error_message(body: bytes | str) -> str:
    """The message of an error body (OpenAI ``{"error": {"message"}}``, vLLM's older
    ``{"message"}``, FastAPI's ``{"detail"}``, or the raw text), on one line, shortened."""
    raw = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _one_line(raw) or "(empty body)"
    msg: Any = None
    if isinstance(obj, dict):
        err = obj.get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        msg = msg or obj.get("message") or obj.get("detail")
    return _one_line(str(msg if msg else raw)) or "(empty body)"


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


def _merge_body(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``; a dict in both (``stream_options``) is merged one level deep, so
    adding ``continuous_usage_stats`` keeps ``include_usage``."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _numpy_default(obj: Any) -> Any:
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


class OpenAIEngine:
    """Streaming client of an OpenAI-compatible server, launched by the tenant or at a URL."""

    vocab_size: int

    def __init__(self, options: OpenAIOptions, model: str, dtype: str, engine_device: str, tenant_dir: Path) -> None:
        if (options.url is None) == (options.launch is None):
            raise ValueError(
                "an openai tenant needs exactly one of openai.url (a running server) and openai.launch "
                f"(a command the tenant starts); got url={options.url!r}, launch={options.launch!r}"
            )
        self.options = options
        self.model = model
        self.dtype = dtype
        self.engine_device = engine_device
        self.tenant_dir = Path(tenant_dir)
        self.vocab_size = 0  # known after load
        self.base_url = ""
        self.model_name: str | None = options.model_name
        self.server_version: str | None = None
        self._server: LaunchedServer | None = None
        self._api_key: str | None = None
        self._headers: dict[str, str] = {}
        self._body: dict[str, Any] = {}
        self._url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._cond = threading.Condition(threading.Lock())
        self._events: list[Event] = []
        self._failed = False  # the loop found the launched server gone or unhealthy
        self._fail_reason = ""
        self._last_check_ns = 0
        self._closed = False

    @classmethod
    def from_spec(cls, spec: dict[str, Any], tenant_dir: Path) -> OpenAIEngine:
        """The engine of one tenant from the orchestrator's spec (``spec["tenant"]["openai"]``
        holds the fields of ``config.OpenAIOptions``)."""
        t = spec["tenant"]
        return cls(
            OpenAIOptions(**t.get("openai") or {}),
            model=t["model"],
            dtype=t.get("dtype", "bfloat16"),
            engine_device=spec.get("engine_device", "cpu"),
            tenant_dir=tenant_dir,
        )

    # -- lifecycle ------------------------------------------------------------------------------

    def load(self) -> None:
        """Launch the server (or find the running one), wait until it answers, learn the model
        name, and start the client loop."""
        o = self.options
        self.vocab_size = int(o.vocab_size) if o.vocab_size else model_vocab_size(self.model)
        self._api_key = self._read_api_key()
        if self._api_key:
            self._headers = {"Authorization": f"Bearer {self._api_key}"}
        if o.launch is not None:
            model_arg = self.model
            if self.model.startswith(SYNTHETIC_PREFIX) and "{model}" in o.launch:
                model_arg = str(synthetic_model_dir(self.model, self.dtype, self.tenant_dir / "model"))
            # Kept before start() so that close() stops it even if start() is interrupted.
            self._server = LaunchedServer(
                o.launch, model_arg, self.tenant_dir, o.port, api_key=self._api_key, health_path=o.health_path
            )
            self._server.start(o.health_timeout_s)
            self.base_url = self._server.base_url
        else:
            assert o.url is not None
            self.base_url = normalize_url(o.url, o.endpoint)
            try:
                wait_healthy(self.base_url, o.health_path or "/v1/models", self._headers, o.health_timeout_s)
            except TimeoutError as e:
                raise ServerError(
                    f"server at {self.base_url} did not answer within {o.health_timeout_s:g} s ({e}); start it or fix openai.url"
                ) from None
            except PermissionError as e:
                raise ServerError(f"server at {self.base_url} refuses the harness: {e}") from None
        if self.model_name is None:
            self.model_name = self._discover_model_name()
        self.server_version = self._server_version()
        # The per-request fields and then extra_body are added in _body_bytes.
        self._body = {"model": self.model_name, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
        self._url = self.base_url + o.endpoint
        self._start_loop()

    def warmup(self) -> None:
        """Nothing to do here: the server warms itself up, and the tenant serves
        ``warmup_requests`` through the loop before ``ready``."""

    def _read_api_key(self) -> str | None:
        name = self.options.api_key_env
        if not name:
            return None
        key = os.environ.get(name)
        if not key:
            raise ValueError(f"openai.api_key_env names {name} but it is not set in the environment; export {name}")
        return key

    def _discover_model_name(self) -> str:
        url = self.base_url + "/v1/models"
        try:
            status, body = http_get(url, self._headers, INFO_TIMEOUT_S)
            if status != 200:
                raise ValueError(f"HTTP {status}: {error_message(body)}")
            return str(orjson.loads(body)["data"][0]["id"])
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise ServerError(
                f"cannot learn the model name from GET {url} ({_one_line(str(e))}); set openai.model_name"
            ) from None

    def _server_version(self) -> str | None:
        try:
            status, body = http_get(self.base_url + "/version", self._headers, INFO_TIMEOUT_S)
            if status == 200:
                return str(orjson.loads(body)["version"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # optional: only some servers (vLLM) have /version
        return None

    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="openai-client", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open_session(), loop).result(timeout=30)

    async def _open_session(self) -> None:
        self._session = aiohttp.ClientSession(
            # No connection limit: the tenant's arrival process, not the pool, decides concurrency.
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=self.options.request_timeout_s),
            headers={"Content-Type": "application/json", **self._headers},
        )

    def close(self) -> None:
        """Cancel what is in flight, close the session and the loop, stop a launched server
        (never a ``url`` one). Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
            except Exception as e:  # closing is cleanup: report and go on to the server
                print(f"openai engine: closing the client failed: {type(e).__name__}: {e}", file=sys.stderr)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            if not thread.is_alive():
                loop.close()
        if self._server is not None:
            self._server.stop()

    async def _shutdown(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # -- serving --------------------------------------------------------------------------------

    def submit(self, request: RequestSpec) -> None:
        """Send one request (returns at once; its tokens come back through ``poll``)."""
        if self._loop is None or self._closed:
            raise RuntimeError("submit before load() or after close() of the openai engine")
        self._loop.call_soon_threadsafe(self._start_request, request)

    def _start_request(self, request: RequestSpec) -> None:
        assert self._loop is not None
        rid = request.rid
        task = self._loop.create_task(self._run_request(request))
        self._tasks[rid] = task
        task.add_done_callback(functools.partial(self._forget, rid))

    def _forget(self, rid: int, task: asyncio.Task[None]) -> None:
        if self._tasks.get(rid) is task:
            del self._tasks[rid]

    def cancel(self, rids: list[int]) -> None:
        """Stop these requests: their tasks are cancelled and their streams closed."""
        if self._loop is not None and not self._closed:
            self._loop.call_soon_threadsafe(self._cancel_tasks, list(rids))

    def _cancel_tasks(self, rids: list[int]) -> None:
        for rid in rids:
            task = self._tasks.get(rid)
            if task is not None:
                task.cancel()

    def poll(self, timeout_s: float) -> Progress:
        """Events since the last poll, all with t_ns <= now_ns (later ones will have t_ns >
        now_ns); waits up to ``timeout_s`` when there are none. Raises EngineFailed when the
        launched server has died or stopped serving (module docstring)."""
        server = self._server
        if server is not None:
            t = time.monotonic_ns()
            if t - self._last_check_ns >= SERVER_CHECK_INTERVAL_NS:
                self._last_check_ns = t
                server.check_alive()
        with self._cond:
            if not self._events and not self._failed and timeout_s > 0:
                self._cond.wait(timeout_s)
            if not self._failed:
                now = time.monotonic_ns()
                events, self._events = self._events, []
                return Progress(now, events)
        assert server is not None  # _failed is only set for a launched server
        server.check_alive()  # it exited: say how
        raise EngineFailed(
            f"server `{server.command}` (pid {server.pid}) stopped serving mid-run ({self._fail_reason}): {server.last_words()}"
        )

    def _emit(self, rid: int, n: int) -> None:
        with self._cond:
            self._events.append(Emission(time.monotonic_ns(), [rid], [n]))
            self._cond.notify()

    def _complete(self, rid: int, status: str, error: str | None = None, fields: dict[str, Any] | None = None) -> None:
        with self._cond:
            self._events.append(Completion(time.monotonic_ns(), rid, status, error, fields))
            self._cond.notify()

    def _body_bytes(self, request: RequestSpec) -> bytes:
        body = dict(self._body)
        body["prompt"] = request.prompt_ids
        body["max_tokens"] = request.n_out
        if self.options.ignore_eos:
            body["ignore_eos"] = True
            body["min_tokens"] = request.n_out
        if self.options.extra_body:
            body = _merge_body(body, self.options.extra_body)
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY, default=_numpy_default)

    async def _run_request(self, request: RequestSpec) -> None:
        rid = request.rid
        count = StreamCount()
        assert self._session is not None
        try:
            async with self._session.post(self._url, data=self._body_bytes(request)) as resp:
                if resp.status != 200:
                    error = f"HTTP {resp.status}: {error_message(await resp.read())}"
                    if resp.status < 500 or not await self._server_failed(error):
                        self._complete(rid, STATUS_ERROR, error)
                    return
                done = await self._read_stream(rid, resp.content, count)
        except asyncio.CancelledError:
            raise  # cancelled by the tenant, which logs it
        except TimeoutError:
            self._complete(
                rid,
                STATUS_ERROR,
                f"no complete response within openai.request_timeout_s={self.options.request_timeout_s:g} s "
                f"after {count.streamed} tokens",
            )
            return
        except StreamError as e:
            if not await self._server_failed(str(e)):
                self._complete(rid, STATUS_ERROR, f"server error in the stream after {count.streamed} tokens: {e}")
            return
        except (aiohttp.ClientError, OSError) as e:
            await self._connection_failed(rid, e, count)
            return
        except Exception as e:  # a chunk we cannot read: this request fails, the tenant goes on
            self._complete(rid, STATUS_ERROR, f"unreadable response: {type(e).__name__}: {_one_line(str(e))}")
            return
        if not (done or count.finished or count.usage_tokens is not None):
            self._complete(rid, STATUS_ERROR, f"stream ended after {count.streamed} tokens without a finish_reason or [DONE]")
            return
        fields: dict[str, Any] | None = None
        u = count.usage_tokens
        if u is not None:
            fields = {DONE_USAGE_TOKENS: u}
            if u != count.streamed:
                fields[DONE_WARNING] = f"server usage reports {u} tokens, the stream carried {count.streamed}"
        self._complete(rid, STATUS_OK, fields=fields)

    async def _read_stream(self, rid: int, content: aiohttp.StreamReader, count: StreamCount) -> bool:
        """Turn SSE lines into emissions until ``data: [DONE]`` (True) or the end of the body (False)."""
        while True:
            line = await content.readline(max_line_length=MAX_LINE_BYTES)
            if not line:
                return False
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event:/id: fields
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return True
            n = count.feed(orjson.loads(payload))
            if n > 0:
                self._emit(rid, n)
            elif count.usage_tokens is not None and count.usage_tokens > count.streamed:
                # The server generated tokens the chunks did not show (see the module docstring):
                # they exist by now, so they are emitted now and n_out is the server's count.
                self._emit(rid, count.usage_tokens - count.streamed)

    async def _connection_failed(self, rid: int, e: BaseException, count: StreamCount) -> None:
        what = f"{type(e).__name__}: {_one_line(str(e))}" if str(e) else type(e).__name__
        if not await self._server_failed(what, dropped=True):
            self._complete(rid, STATUS_ERROR, f"connection to {self.base_url} failed after {count.streamed} tokens ({what})")

    async def _server_failed(self, what: str, dropped: bool = False) -> bool:
        """Whether a server-side failure of one request means the launched server can serve no
        more; if so the engine is marked failed (``poll`` raises EngineFailed) and the request
        gets no error of its own: the server's end wins over the errors it causes.

        Failed: its process has ended, or its health check no longer answers 200 (vLLM's
        /health answers 503 once its engine core is dead, seconds before the server exits).
        A ``url`` server is never judged: its requests just fail."""
        server = self._server
        if server is None or self._session is None:
            return False
        if dropped:
            # A dying server drops its streams a moment before the OS lets us reap it.
            end = time.monotonic() + DEATH_GRACE_S
            while server.returncode is None and time.monotonic() < end:
                await asyncio.sleep(0.02)
        if server.returncode is None:
            path = server.health_path_used or "/health"
            try:
                async with self._session.get(
                    self.base_url + path, timeout=aiohttp.ClientTimeout(total=HEALTH_CHECK_TIMEOUT_S)
                ) as resp:
                    if resp.status == 200:
                        return False
                    reason = f"GET {path} answered HTTP {resp.status} after: {what}"
            except (aiohttp.ClientError, OSError) as e:  # TimeoutError is an OSError
                reason = f"GET {path} failed ({type(e).__name__}) after: {what}"
        else:
            reason = what
        with self._cond:
            if not self._failed:
                self._failed = True
                self._fail_reason = reason
            self._cond.notify()
        return True

    # -- records --------------------------------------------------------------------------------

    def device_info(self) -> dict[str, Any]:
        """The device the server's tenant sees (a probe process with the tenant's environment)."""
        return probe.device_info(self.engine_device)

    def engine_info(self) -> dict[str, Any]:
        """What the manifest records about the server (the API key never appears)."""
        s = self._server
        info: dict[str, Any] = {
            "engine": "openai",
            "base_url": self.base_url,
            "endpoint": self.options.endpoint,
            "model_name": self.model_name,
            "launched": s is not None,
            "server_pid": s.pid if s is not None else None,
            "server_command": s.command if s is not None else None,
        }
        if self.server_version is not None:
            info["server_version"] = self.server_version
        return info
