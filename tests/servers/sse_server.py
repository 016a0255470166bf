"""A small OpenAI-compatible streaming server that stands in for vLLM in unit tests.

Serves ``/health``, ``/version``, ``/v1/models`` and ``/v1/completions`` with SSE chunks in
vLLM's format (one chunk per ``--tokens-per-chunk`` tokens, the last one carrying
``finish_reason``, then a usage chunk when ``stream_options.include_usage`` is set, then
``data: [DONE]``). Token ids are ``(prompt_len + i) % 1000``. Requests longer than
``--max-model-len`` (prompt + max_tokens) get HTTP 400 with vLLM's error JSON.

Options that make it misbehave on purpose, for the harness's failure paths:
``--fail-health`` (503 forever), ``--exit-at-start``, ``--die-after-s S`` (exit with code 3
S seconds after the first completion request), ``--usage-off-by-one``, ``--ignore-sigterm``,
``--spawn-child PIDFILE`` (a child that ignores SIGTERM, its pid written to PIDFILE),
``--spawn-tree PIDFILE`` (a child whose own child ignores SIGTERM),
``--stream-error-after N``, ``--engine-dies-after N`` (error chunks, HTTP 500 and /health
503 from then on, as vLLM once its engine core died), ``--startup-delay-s``. It prints its
argv at start (as vLLM does), so a secret given on the command line lands in its log.

Imports nothing of the harness (it starts in about half a second)::

    python tests/servers/sse_server.py --port 8123 [--host 127.0.0.1] [--token-ids] ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from aiohttp import web

MODEL_NAME = "sse-test-model"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="OpenAI-compatible SSE test server (stands in for vLLM)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model", default=None, help="a model folder (must hold config.json); the served name")
    p.add_argument("--model-name", default=None, help=f"the served name (default: --model, else {MODEL_NAME})")
    p.add_argument("--max-model-len", type=int, default=256, help="prompt + max_tokens above it: HTTP 400")
    p.add_argument("--token-delay-s", type=float, default=0.002, help="pause between chunks")
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    p.add_argument("--token-ids", action="store_true", help="always send token_ids (vLLM: return_token_ids)")
    p.add_argument("--empty-text", action="store_true", help="text '' in every chunk (vLLM without a tokenizer)")
    p.add_argument("--finish-chunk", action="store_true", help="end with a separate empty-text finish_reason chunk")
    p.add_argument("--usage-off-by-one", action="store_true", help="the usage chunk reports one token more")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer <key> on /v1")
    p.add_argument("--fail-health", action="store_true", help="/health answers 503 forever")
    p.add_argument("--no-health", action="store_true", help="/health answers 404 (health via /v1/models)")
    p.add_argument("--exit-at-start", action="store_true", help="exit with code 1 before serving")
    p.add_argument("--die-after-s", type=float, default=None, help="exit 3 this long after the first request")
    p.add_argument("--stream-error-after", type=int, default=None, metavar="N",
                   help="each stream ends in an error chunk after N tokens (the server stays healthy)")
    p.add_argument("--engine-dies-after", type=int, default=None, metavar="N",
                   help="after N tokens in all: error chunks, HTTP 500 and /health 503, as vLLM once its engine core died")
    p.add_argument("--startup-delay-s", type=float, default=0.0, help="sleep before listening")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--spawn-child", default=None, metavar="PIDFILE", help="start a child that ignores SIGTERM")
    p.add_argument("--spawn-tree", default=None, metavar="PIDFILE",
                   help="start a child that starts a grandchild ignoring SIGTERM; 'child grandchild' pids to PIDFILE")
    p.add_argument("--log-requests", default=None, metavar="PATH", help="append each request's headers+body")
    return p.parse_args(argv)


def error_body(message: str, code: int) -> dict[str, Any]:
    """vLLM's error JSON (openai ErrorResponse)."""
    return {"error": {"message": message, "type": "BadRequestError", "param": None, "code": code}}


class Server:
    """Handlers of one server process; ``args`` are its command-line options."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dying = False
        self.tokens = 0  # streamed in all
        self.engine_dead = False

    def _authorized(self, request: web.Request) -> bool:
        return self.args.api_key is None or request.headers.get("Authorization") == f"Bearer {self.args.api_key}"

    async def health(self, request: web.Request) -> web.Response:
        if self.args.no_health:
            return web.Response(status=404)
        return web.Response(status=503 if self.args.fail_health or self.engine_dead else 200)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "sse-test-1"})

    async def models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response(error_body("invalid API key", 401), status=401)
        return web.json_response({"object": "list", "data": [{"id": self.args.model_name, "object": "model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        args = self.args
        raw = await request.read()
        if args.log_requests:
            with open(args.log_requests, "a", encoding="utf-8") as f:
                f.write(json.dumps({"headers": dict(request.headers), "body": json.loads(raw)}) + "\n")
        if not self._authorized(request):
            return web.json_response(error_body("invalid API key", 401), status=401)
        body = json.loads(raw)
        if self.engine_dead:
            return web.json_response(error_body("EngineCore encountered an issue.", 500), status=500)
        if args.die_after_s is not None and not self.dying:
            self.dying = True
            asyncio.get_running_loop().call_later(args.die_after_s, self._die)
        prompt = body.get("prompt")
        if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
            return web.json_response(error_body("prompt must be a list of token ids", 400), status=400)
        if body.get("model") != args.model_name:
            return web.json_response(error_body(f"The model `{body.get('model')}` does not exist.", 404), status=404)
        max_tokens = int(body.get("max_tokens") or 16)
        if len(prompt) + max_tokens > args.max_model_len:
            msg = (
                f"This model's maximum context length is {args.max_model_len} tokens. However, you requested "
                f"{max_tokens} output tokens and your prompt contains {len(prompt)} input tokens"
            )
            return web.json_response(error_body(msg, 400), status=400)

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        stream_options = body.get("stream_options") or {}
        with_ids = args.token_ids or bool(body.get("return_token_ids"))
        continuous = bool(stream_options.get("continuous_usage_stats"))
        sent = 0
        while sent < max_tokens:
            await asyncio.sleep(args.token_delay_s)
            if args.engine_dies_after is not None and self.tokens >= args.engine_dies_after:
                self.engine_dead = True
            if self.engine_dead or (args.stream_error_after is not None and sent >= args.stream_error_after):
                msg = "EngineCore encountered an issue." if self.engine_dead else "stream broke on purpose"
                await resp.write(f"data: {json.dumps(error_body(msg, 500))}\n\n".encode())
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
                return resp
            ids = [(len(prompt) + sent + j) % 1000 for j in range(min(args.tokens_per_chunk, max_tokens - sent))]
            sent += len(ids)
            self.tokens += len(ids)
            last = sent == max_tokens and not args.finish_chunk
            choice: dict[str, Any] = {
                "index": 0,
                "text": "" if args.empty_text else "".join(f" t{i}" for i in ids),
                "logprobs": None,
                "finish_reason": "length" if last else None,
                "stop_reason": None,
            }
            if with_ids:
                choice["token_ids"] = ids
            chunk: dict[str, Any] = {"id": "cmpl-test", "object": "text_completion", "model": args.model_name, "choices": [choice]}
            if continuous:
                chunk["usage"] = {"prompt_tokens": len(prompt), "completion_tokens": sent, "total_tokens": len(prompt) + sent}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if args.finish_chunk:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length", "stop_reason": None}
            chunk = {"id": "cmpl-test", "object": "text_completion", "model": args.model_name, "choices": [choice]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if stream_options.get("include_usage"):
            n = sent + (1 if args.usage_off_by_one else 0)
            usage = {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}
            chunk = {"id": "cmpl-test", "object": "text_completion", "model": args.model_name, "choices": [], "usage": usage}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _die(self) -> None:
        print("sse_server: dying on purpose (--die-after-s)", file=sys.stderr, flush=True)
        os._exit(3)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"sse_server args: {sys.argv[1:]}", flush=True)
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        print(f"sse_server: {args.model} holds no config.json", file=sys.stderr, flush=True)
        sys.exit(2)
    args.model_name = args.model_name or args.model or MODEL_NAME
    if args.exit_at_start:
        print("sse_server: exiting at start (--exit-at-start)", file=sys.stderr, flush=True)
        sys.exit(1)
    if args.spawn_child:
        child = subprocess.Popen(
            [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]
        )
        with open(args.spawn_child, "w", encoding="utf-8") as f:
            f.write(str(child.pid))
    if args.spawn_tree:
        middle = (
            "import subprocess, sys, time; "
            "g = subprocess.Popen([sys.executable, '-c', "
            "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); "
            f"open({args.spawn_tree!r} + '.tmp', 'w').write(f'{{g.pid}}'); time.sleep(600)"
        )
        child = subprocess.Popen([sys.executable, "-c", middle])
        while not os.path.exists(args.spawn_tree + ".tmp"):
            time.sleep(0.01)
        time.sleep(0.05)  # the file is written in one call; let it land
        with open(args.spawn_tree + ".tmp", encoding="utf-8") as f:
            grand = f.read().strip()
        with open(args.spawn_tree, "w", encoding="utf-8") as f:
            f.write(f"{child.pid} {grand}")
    if args.startup_delay_s:
        time.sleep(args.startup_delay_s)
    server = Server(args)
    app = web.Application()
    app.router.add_get("/health", server.health)
    app.router.add_get("/version", server.version)
    app.router.add_get("/v1/models", server.models)
    app.router.add_post("/v1/completions", server.completions)
    if args.ignore_sigterm:
        # run_app installs its own SIGTERM handler; replace it once the loop runs.
        async def ignore(app: web.Application) -> None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: None)

        app.on_startup.append(ignore)
    print(f"sse_server: serving on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
