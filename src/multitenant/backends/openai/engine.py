"""The ``openai`` backend: a streaming client of an OpenAI-compatible completions server.

The server is either one the tenant launches (``openai.launch``, see ``server.py``: it runs
in the tenant's process group, under the tenant's MPS share, and is stopped at the end) or a
running one at ``openai.url`` that the harness never starts or stops.

Requests are token-id prompts POSTed to ``<base_url><endpoint>`` (``/v1/completions``) with
``stream: true``; each SSE chunk that carries tokens becomes an ``Emission`` stamped with
``time.monotonic_ns()`` when the client received it; ``sse.py`` says how many tokens a chunk
carries. The final usage chunk gives the server's own count, recorded in ``done`` as
``usage_tokens``. When it exceeds what the stream carried (a server that packs tokens, or vLLM
without a tokenizer, whose last token comes in an empty-text chunk with the finish reason), the
missing tokens are emitted when the usage chunk arrives, so ``n_out`` is the server's count;
any disagreement also puts a one-line ``warning`` in ``done``.

Failures: a request the server rejects or breaks off (HTTP error, an ``error`` chunk, a dropped
connection) is a ``Completion`` with status error, and the tenant goes on. A launched server
that has died, or whose health check no longer answers 200 after such a failure (vLLM once
its engine core died), makes ``poll`` raise EngineFailed instead, before the errors it caused.

Threads: the loop, the per-request tasks and the locked event list are ``stream.StreamEngine``'s;
this engine adds one aiohttp session on that loop and the launched server's checks.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from multitenant.backends.base import DeviceInfo, EngineContext, EngineFailed
from multitenant.backends.openai import OpenAIOptions
from multitenant.backends.openai.sse import (
    StreamCount,
    StreamError,
    error_message,
    merge_body,
    normalize_url,
    numpy_default,
    one_line,
)
from multitenant.backends.probe import device_info as probe_device_info
from multitenant.backends.server import LaunchedServer, ServerError, http_get, wait_healthy
from multitenant.backends.stream import StreamEngine
from multitenant.models import SYNTHETIC_PREFIX, model_vocab_size, synthetic_model_dir
from multitenant.schema import DONE_USAGE_TOKENS, DONE_WARNING, RequestStatus
from multitenant.workload import RequestSpec

SERVER_CHECK_INTERVAL_NS = 50_000_000  # poll checks the launched server's process this often
DEATH_GRACE_S = 1.0  # a dropped stream waits this long for a dying server to be reaped
HEALTH_CHECK_TIMEOUT_S = 5.0  # after a server-side error: is the server still healthy?
MAX_LINE_BYTES = 64 << 20  # one SSE line; vLLM's first chunk repeats the prompt's token ids
INFO_TIMEOUT_S = 10.0  # GET /v1/models, /version after the server is healthy


def build(ctx: EngineContext) -> OpenAIEngine:
    """The engine of one tenant (the factory its declaration's ``engine`` names)."""
    options = ctx.options if ctx.options is not None else OpenAIOptions()
    return OpenAIEngine(options, ctx.tenant.model, ctx.tenant.dtype, ctx.device, ctx.tenant_dir)


class OpenAIEngine(StreamEngine):
    """Streaming client of an OpenAI-compatible server, launched by the tenant or at a URL."""

    thread_name = "openai-client"

    def __init__(self, options: OpenAIOptions, model: str, dtype: str, engine_device: str, tenant_dir: Path) -> None:
        if (options.url is None) == (options.launch is None):
            raise ValueError(
                "an openai tenant needs exactly one of openai.url (a running server) and openai.launch "
                f"(a command the tenant starts); got url={options.url!r}, launch={options.launch!r}"
            )
        super().__init__()
        self.options = options
        self.model = model
        self.dtype = dtype
        self.engine_device = engine_device
        self.tenant_dir = Path(tenant_dir)
        self.base_url = ""
        self.model_name: str | None = options.model_name
        self.server_version: str | None = None
        self._server: LaunchedServer | None = None
        self._api_key: str | None = None
        self._headers: dict[str, str] = {}
        self._body: dict[str, Any] = {}
        self._url = ""
        self._session: aiohttp.ClientSession | None = None
        self._last_check_ns = 0

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
        self._run(self._open_session(), 30)

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
                f"cannot learn the model name from GET {url} ({one_line(str(e))}); set openai.model_name"
            ) from None

    def _server_version(self) -> str | None:
        try:
            status, body = http_get(self.base_url + "/version", self._headers, INFO_TIMEOUT_S)
            if status == 200:
                return str(orjson.loads(body)["version"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # optional: only some servers (vLLM) have /version
        return None

    async def _open_session(self) -> None:
        self._session = aiohttp.ClientSession(
            # No connection limit: the tenant's arrival process, not the pool, decides concurrency.
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=self.options.request_timeout_s),
            headers={"Content-Type": "application/json", **self._headers},
        )

    async def _aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _after_close(self) -> None:
        """Stop a launched server (never a ``url`` one)."""
        if self._server is not None:
            self._server.stop()

    # -- serving --------------------------------------------------------------------------------

    def _before_poll(self) -> None:
        """A launched server whose process has ended makes ``poll`` raise EngineFailed."""
        server = self._server
        if server is not None:
            t = time.monotonic_ns()
            if t - self._last_check_ns >= SERVER_CHECK_INTERVAL_NS:
                self._last_check_ns = t
                server.check_alive()

    def _engine_failed(self, reason: str) -> EngineFailed:
        server = self._server
        assert server is not None  # only a launched server is judged failed
        server.check_alive()  # it exited: say how
        return EngineFailed(
            f"server `{server.command}` (pid {server.pid}) stopped serving mid-run ({reason}): {server.last_words()}"
        )

    def _body_bytes(self, request: RequestSpec) -> bytes:
        body = dict(self._body)
        body.update(prompt=request.prompt_ids, max_tokens=request.n_out)
        if self.options.ignore_eos:
            body.update(ignore_eos=True, min_tokens=request.n_out)
        if self.options.extra_body:
            body = merge_body(body, self.options.extra_body)
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY, default=numpy_default)

    async def _serve(self, request: RequestSpec) -> None:
        rid = request.rid
        count = StreamCount()
        assert self._session is not None
        try:
            async with self._session.post(self._url, data=self._body_bytes(request)) as resp:
                if resp.status != 200:
                    error = f"HTTP {resp.status}: {error_message(await resp.read())}"
                    if resp.status < 500 or not await self._server_failed(error):
                        self._record(rid, status=RequestStatus.ERROR, error=error)
                    return
                done = await self._read_stream(rid, resp.content, count)
        except asyncio.CancelledError:
            raise  # cancelled by the tenant, which logs it
        except TimeoutError:
            self._record(
                rid,
                status=RequestStatus.ERROR,
                error=f"no complete response within openai.request_timeout_s={self.options.request_timeout_s:g} s "
                f"after {count.streamed} tokens",
            )
            return
        except StreamError as e:
            if not await self._server_failed(str(e)):
                error = f"server error in the stream after {count.streamed} tokens: {e}"
                self._record(rid, status=RequestStatus.ERROR, error=error)
            return
        except (aiohttp.ClientError, OSError) as e:
            await self._connection_failed(rid, e, count)
            return
        except Exception as e:  # a chunk we cannot read: this request fails, the tenant goes on
            error = f"unreadable response: {type(e).__name__}: {one_line(str(e))}"
            self._record(rid, status=RequestStatus.ERROR, error=error)
            return
        if not (done or count.finished or count.usage_tokens is not None):
            error = f"stream ended after {count.streamed} tokens without a finish_reason or [DONE]"
            self._record(rid, status=RequestStatus.ERROR, error=error)
            return
        fields: dict[str, Any] | None = None
        u = count.usage_tokens
        if u is not None:
            fields = {DONE_USAGE_TOKENS: u}
            if u != count.streamed:
                fields[DONE_WARNING] = f"server usage reports {u} tokens, the stream carried {count.streamed}"
        self._record(rid, status=RequestStatus.OK, fields=fields)

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
                self._record(rid, n)
            elif count.usage_tokens is not None and count.usage_tokens > count.streamed:
                # The server generated tokens the chunks did not show (see the module docstring):
                # they exist by now, so they are emitted now and n_out is the server's count.
                self._record(rid, count.usage_tokens - count.streamed)

    async def _connection_failed(self, rid: int, e: BaseException, count: StreamCount) -> None:
        what = f"{type(e).__name__}: {one_line(str(e))}" if str(e) else type(e).__name__
        if not await self._server_failed(what, dropped=True):
            error = f"connection to {self.base_url} failed after {count.streamed} tokens ({what})"
            self._record(rid, status=RequestStatus.ERROR, error=error)

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
        self._fail(reason)
        return True

    # -- records --------------------------------------------------------------------------------

    def device_info(self) -> DeviceInfo:
        """The device the server's tenant sees (a probe process with the tenant's environment)."""
        return probe_device_info(self.engine_device)

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
