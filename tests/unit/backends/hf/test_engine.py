"""backends/hf: the eager engine, the static (uncaptured) decode path and the tenant protocol on CPU.

The static path with ``graph_impl="none"`` is the exact decode step that ``graphs`` captures,
run without capture; comparing it with eager on the CPU checks the static cache, the masks and
the position ids. Capture itself is checked on a GPU (tests/gpu/test_graphs.py).
"""

from __future__ import annotations

import random
import time
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from multitenant.backends.base import Completion, Emission, Iteration  # noqa: E402
from multitenant.backends.hf.batching import bucket_for  # noqa: E402
from multitenant.backends.hf.engine import HFEngine  # noqa: E402
from multitenant.backends.hf.graphs import _FusedLinear, _StashedLinear, fuse_projections  # noqa: E402
from multitenant.workload import RequestSpec  # noqa: E402

TINY = "synthetic:tiny-llama"
# The same architecture code paths as the packaged configs, at test size.
SMALL_OVERRIDES = {
    "synthetic:tiny-llama": None,
    "synthetic:qwen2.5-0.5b": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, bos_token_id=1, eos_token_id=2,
    ),
    "synthetic:mistral-7b": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=1024,
    ),
    "synthetic:gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=1024, bos_token_id=1, eos_token_id=2),
}  # fmt: skip


def make_prompts(lengths, vocab=1000, seed=0):
    rng = random.Random(seed)
    return [np.array([rng.randrange(vocab) for _ in range(n)], dtype=np.int64) for n in lengths]


def engine(execution="eager", model=TINY, impl="none", max_batch=4, max_in=32, max_out=16, **kw):
    e = HFEngine(
        model, "float32", "cpu", execution, "generate", max_batch, max_in, max_out,
        graph_impl=impl, config_overrides=SMALL_OVERRIDES.get(model), **kw,
    )  # fmt: skip
    e.load()
    return e


def run_batch(e, prompts, n_out):
    e.start_batch(prompts, n_out)
    steps = []
    while True:
        got = e.step()
        if not got:
            break
        steps.append(got)
    return e.generated_tokens(), steps


# ---------------------------------------------------------------------------------------------
# engine construction errors


def test_graphs_on_cpu_raises_with_the_fix():
    with pytest.raises(RuntimeError, match="use execution=eager"):
        HFEngine(TINY, "float32", "cpu", "graphs", "generate", 4, 32, 16)


@pytest.mark.parametrize("impl", ["inductor_cudagraph", "cudagraph", "reduce_overhead"])
def test_every_capturing_impl_refuses_cpu(impl):
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        HFEngine(TINY, "float32", "cpu", "graphs", "generate", 4, 32, 16, graph_impl=impl)


def test_graphs_for_forward_task_raises():
    with pytest.raises(ValueError, match="use execution=eager for task=forward"):
        HFEngine("synthetic:bert-base", "float32", "cpu", "graphs", "forward", 4, 32, 1, graph_impl="none")


def test_graphs_unsupported_model_type_raises_at_load():
    e = HFEngine(
        "synthetic:qwen2.5-0.5b", "float32", "cpu", "graphs", "generate", 2, 16, 4, graph_impl="none",
        config_overrides={**SMALL_OVERRIDES["synthetic:qwen2.5-0.5b"], "model_type": "qwen3"},
    )  # fmt: skip
    with pytest.raises(ValueError, match="does not support model_type qwen3.*use execution=eager"):
        e.load()


def test_graphs_refuses_a_cache_longer_than_a_sliding_window():
    e = HFEngine(
        "synthetic:mistral-7b", "float32", "cpu", "graphs", "generate", 2, 100, 10, graph_impl="none",
        config_overrides={**SMALL_OVERRIDES["synthetic:mistral-7b"], "sliding_window": 64},
    )  # fmt: skip
    with pytest.raises(ValueError, match="sliding window of 64"):
        e.load()


def test_bad_arguments():
    with pytest.raises(ValueError, match="execution"):
        HFEngine(TINY, "float32", "cpu", "jit", "generate", 4, 32, 16)
    with pytest.raises(ValueError, match="task"):
        HFEngine(TINY, "float32", "cpu", "eager", "train", 4, 32, 16)
    with pytest.raises(ValueError, match="max_batch"):
        HFEngine(TINY, "float32", "cpu", "eager", "generate", 0, 32, 16)
    with pytest.raises(ValueError, match="graph_impl"):
        HFEngine(TINY, "float32", "cpu", "eager", "generate", 4, 32, 16, graph_impl="tensorrt")


def test_too_many_positions_raises_at_load():
    e = HFEngine("synthetic:gpt2", "float32", "cpu", "eager", "generate", 1, 1000, 100,
                    config_overrides=SMALL_OVERRIDES["synthetic:gpt2"])  # fmt: skip
    with pytest.raises(ValueError, match="1024 positions"):
        e.load()


# ---------------------------------------------------------------------------------------------
# eager engine on the CPU


def test_device_info_on_cpu():
    e = HFEngine(TINY, "float32", "cpu", "eager", "generate", 4, 32, 16)
    info = e.device_info()
    assert info.device == "cpu" and info.sms is None and info.total_memory_bytes is None
    assert isinstance(info.device_name, str) and info.device_name


def test_eager_steps_give_each_request_exactly_n_out_tokens():
    e = engine()
    assert e.vocab_size == 1024
    n_out = [4, 1, 6]
    tokens, steps = run_batch(e, make_prompts([5, 9, 3]), n_out)
    assert steps == [[0, 1, 2], [0, 2], [0, 2], [0, 2], [2], [2]]
    assert [len(t) for t in tokens] == n_out
    assert all(0 <= t < e.vocab_size for seq in tokens for t in seq)
    assert e.step() == [] and e.step() == []  # stays finished


def test_eager_left_padded_batch_matches_each_prompt_alone():
    e = engine()
    prompts = make_prompts([5, 11, 2, 8], seed=1)
    n_out = [6, 3, 8, 1]
    batched, _ = run_batch(e, prompts, n_out)
    alone = [run_batch(e, [p], [n])[0][0] for p, n in zip(prompts, n_out, strict=True)]
    assert batched == alone


def test_start_batch_validates_and_a_new_batch_replaces_an_unfinished_one():
    e = engine()
    with pytest.raises(ValueError, match="max_input_len"):
        e.start_batch([np.ones(40, np.int64)], [2])
    prompts = make_prompts([4, 6])
    e.start_batch(prompts, [5, 5])
    e.step()
    e.step()  # abandon after two steps
    full, _ = run_batch(e, prompts, [5, 5])
    assert [len(t) for t in full] == [5, 5]


def test_warmup_leaves_no_batch_behind():
    e = engine()
    e.warmup()
    assert e.step() == [] and e.generated_tokens() == []


def test_forward_batch_runs_an_encoder():
    e = HFEngine("synthetic:distilbert", "float32", "cpu", "eager", "forward", 4, 32, 1,
                    config_overrides={"n_layers": 1})  # fmt: skip
    e.load()
    e.warmup()
    e.forward_batch(make_prompts([3, 17, 9], vocab=e.vocab_size))
    with pytest.raises(RuntimeError, match="forward_batch"):
        e.start_batch([np.ones(1, np.int64)], [1])
    with pytest.raises(ValueError, match="exceeds max_batch"):
        e.forward_batch(make_prompts([3] * 5))


# ---------------------------------------------------------------------------------------------
# static decode path (what graphs captures), uncaptured, against eager


@pytest.mark.parametrize("model", sorted(SMALL_OVERRIDES))
def test_static_path_matches_eager_tokens_and_logits(model):
    prompts = make_prompts([5, 9, 3], seed=2)
    n_out = [4, 1, 7]
    eager = engine("eager", model, keep_logits=True)
    static = engine("graphs", model, impl="none", keep_logits=True)
    static.warmup()
    te, se = run_batch(eager, prompts, n_out)
    ts, ss = run_batch(static, prompts, n_out)
    assert ts == te and ss == se
    le, ls = eager.step_logits(), static.step_logits()
    assert len(le) == len(ls) == max(n_out)
    for a, b in zip(le, ls, strict=True):
        # rows of finished requests keep decoding; their logits must agree too
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", ["synthetic:tiny-llama", "synthetic:gpt2"])
def test_no_deprecated_transformers_call(model):
    """transformers 5 renamed the forward's ``past_key_values`` to ``cache`` (the old name is
    removed in 5.40): neither path may use a name transformers has deprecated."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        for execution in ("eager", "graphs"):
            e = engine(execution, model, impl="none")
            e.warmup()
            tokens, _ = run_batch(e, make_prompts([5, 3], seed=3), [3, 2])
            assert [len(t) for t in tokens] == [3, 2]


def test_static_path_partial_batches_reuse_buckets():
    """Batches of 1..max_batch through the buckets (padding rows in partial buckets), each equal
    to eager; a later batch must not see anything of an earlier one (cache, mask, positions)."""
    eager = engine("eager", max_batch=8)
    static = engine("graphs", impl="none", max_batch=8)
    static.warmup()
    for n, seed in [(3, 0), (8, 1), (1, 2), (5, 3), (3, 4)]:
        rng = random.Random(seed)
        prompts = make_prompts([rng.randint(1, 32) for _ in range(n)], seed=seed)
        n_out = [rng.randint(1, 16) for _ in range(n)]
        assert run_batch(static, prompts, n_out) == run_batch(eager, prompts, n_out)
        assert static._bucket == bucket_for(n, static.buckets)


def test_static_path_longest_batch_fills_the_cache():
    static = engine("graphs", impl="none", max_batch=2, max_in=32, max_out=16)
    eager = engine("eager", max_batch=2, max_in=32, max_out=16)
    prompts = make_prompts([32, 31], seed=5)
    assert run_batch(static, prompts, [16, 16]) == run_batch(eager, prompts, [16, 16])


def test_static_path_traces_as_one_graph():
    """The decode step compiles without graph breaks (fullgraph=True, as the GPU impls use it);
    aot_eager checks tracing and functionalization of the in-place cache updates cheaply."""
    static = engine("graphs", impl="none", max_batch=2)
    static._runner._fn = torch.compile(static._runner._decode_core, backend="aot_eager", fullgraph=True, dynamic=False)
    static.warmup()
    prompts = make_prompts([3, 7], seed=6)
    assert run_batch(static, prompts, [5, 2]) == run_batch(engine("eager", max_batch=2), prompts, [5, 2])


@pytest.mark.parametrize("model", ["synthetic:tiny-llama", "synthetic:qwen2.5-0.5b"])
def test_fused_projections_compute_the_same_forward(model):
    from multitenant.models import build_model

    ref, _ = build_model(model, "float32", "cpu", "generate", config_overrides=SMALL_OVERRIDES[model])
    fused, info = build_model(model, "float32", "cpu", "generate", config_overrides=SMALL_OVERRIDES[model])
    n_params = sum(p.numel() for p in fused.parameters())
    assert fuse_projections(fused) == 2 * fused.config.num_hidden_layers
    attn = fused.base_model.layers[0].self_attn
    assert isinstance(attn.q_proj, _FusedLinear) and isinstance(attn.v_proj, _StashedLinear)
    assert (attn.q_proj.bias is not None) == (model == "synthetic:qwen2.5-0.5b")  # qwen2 has q/k/v biases
    assert sum(p.numel() for p in fused.parameters()) == n_params == info["params"]
    ids = torch.from_numpy(np.stack(make_prompts([12, 12], vocab=1000, seed=7)))
    torch.testing.assert_close(fused(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_unfused_static_path_matches_fused():
    prompts, n_out = make_prompts([6, 2, 9], seed=8), [5, 3, 4]
    a = engine("graphs", impl="none", fuse=False)
    b = engine("graphs", impl="none", fuse=True)
    assert not isinstance(a.model.base_model.layers[0].self_attn.q_proj, _FusedLinear)
    assert run_batch(a, prompts, n_out) == run_batch(b, prompts, n_out)


# ---------------------------------------------------------------------------------------------
# the tenant protocol: submit / poll / cancel (static batching as the engine's policy)


def drain(e, limit=1000):
    """Poll until nothing is left; returns every event, checking the time-order contract."""
    events, last_now = [], 0
    for _ in range(limit):
        progress = e.poll(0.0)
        assert all(ev.t_ns <= progress.now_ns for ev in progress.events)
        assert all(ev.t_ns > last_now for ev in progress.events), "events are newer than the last poll's now_ns"
        last_now = progress.now_ns
        if not progress.events and not e._batch and not e._waiting:
            return events
        events.extend(progress.events)
    raise AssertionError("engine did not drain")


def test_protocol_batches_at_most_max_batch_and_finishes_every_request():
    e = engine(max_batch=2)
    reqs = [RequestSpec(rid, p, n) for rid, (p, n) in enumerate(zip(make_prompts([3, 5, 2]), [3, 1, 2], strict=True))]
    for r in reqs:
        e.submit(r)
    events = drain(e)
    tokens = {r.rid: 0 for r in reqs}
    done = {}
    for ev in events:
        if isinstance(ev, Emission):
            assert len(ev.rids) <= 2
            for rid, n in zip(ev.rids, ev.counts, strict=True):
                tokens[rid] += n
        elif isinstance(ev, Completion):
            done[ev.rid] = (ev.status, tokens[ev.rid])
    assert done == {0: ("ok", 3), 1: ("ok", 1), 2: ("ok", 2)}
    # Static batching: request 2 starts only after the batch of 0 and 1 is over (after 0's 3rd token).
    first_of_2 = next(i for i, ev in enumerate(events) if isinstance(ev, Emission) and 2 in ev.rids)
    last_of_0 = max(i for i, ev in enumerate(events) if isinstance(ev, Emission) and 0 in ev.rids)
    assert first_of_2 > last_of_0


def test_protocol_idle_poll_waits_and_reports_nothing():
    e = engine()
    t0 = time.monotonic()
    progress = e.poll(0.02)
    assert progress.events == [] and time.monotonic() - t0 >= 0.015


def test_protocol_cancel_drops_waiting_requests_and_an_all_cancelled_batch():
    e = engine(max_batch=1)
    p = make_prompts([4, 4])
    e.submit(RequestSpec(0, p[0], 8))
    e.submit(RequestSpec(1, p[1], 8))
    e.poll(0.0)  # request 0 runs, request 1 waits
    e.cancel([0, 1])
    assert drain(e) == []


def test_protocol_forward_reports_an_iteration_and_completions():
    e = HFEngine("synthetic:distilbert", "float32", "cpu", "eager", "forward", 4, 32, 1,
                 config_overrides={"n_layers": 1})  # fmt: skip
    e.load()
    for rid, prompt in enumerate(make_prompts([3, 9, 5], vocab=e.vocab_size)):
        e.submit(RequestSpec(rid, prompt, 1))
    progress = e.poll(0.0)
    iters = [ev for ev in progress.events if isinstance(ev, Iteration)]
    assert len(iters) == 1 and iters[0].batch == 3 and iters[0].dur_ns > 0
    assert sorted(ev.rid for ev in progress.events if isinstance(ev, Completion)) == [0, 1, 2]


def test_engine_info_names_the_execution():
    e = engine("graphs", impl="none")
    info = e.engine_info()
    assert info["engine"] == "hf" and info["execution"] == "graphs" and info["batch_buckets"] == [1, 2, 4]
