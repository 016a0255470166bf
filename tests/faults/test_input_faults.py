"""Bad input: every class of bad config value and a malformed dataset (``mt-run`` exits 2 with
one line naming the field, before anything starts), and a truncated ``events.jsonl`` given to
``mt-analyze`` (analysed, with a warning)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from tests.faults.helpers import PAIR, Watched, mt_analyze, processes_left, read_log

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

T = "tenants.a"
W = f"{T}.workload"

# One override per class of bad value the harness validates, and the field its message names.
BAD_VALUES = {
    "mode": (["mode=gpu"], "mode"),
    "mode needs a GPU": (["mode=timeslice", "device=cpu"], "device"),
    "device": (["device=tpu:0"], "device"),
    "tenant device": ([f"{T}.device=tpu:0"], f"{T}.device"),
    "ready_timeout_s": (["ready_timeout_s=0"], "ready_timeout_s"),
    "stop_timeout_s": (["stop_timeout_s=-1"], "stop_timeout_s"),
    "hang_timeout_s": (["hang_timeout_s=0.2"], "hang_timeout_s"),
    "window_lead_s": (["window_lead_s=-1"], "window_lead_s"),
    "telemetry_interval_ms": (["telemetry_interval_ms=5"], "telemetry_interval_ms"),
    "split": (["split=70/20/10"], "split"),
    "backend": ([f"{T}.backend=tgi"], f"{T}.backend"),
    "task": ([f"{T}.task=classify"], f"{T}.task"),
    "execution": ([f"{T}.execution=fast"], f"{T}.execution"),
    "graphs on the CPU": ([f"{T}.execution=graphs"], f"{T}.execution"),
    "dtype": ([f"{T}.dtype=int4"], f"{T}.dtype"),
    "model": ([f"{T}.model=synthetic:nope"], f"{T}.model"),
    "encoder asked to generate": ([f"{T}.model=synthetic:bert-base"], f"{T}.task"),
    "max_batch": ([f"{T}.max_batch=0"], f"{T}.max_batch"),
    "cpu_threads": ([f"{T}.cpu_threads=0"], f"{T}.cpu_threads"),
    "dataset kind": ([f"{W}.dataset.kind=csv"], f"{W}.dataset.kind"),
    "input_len": ([f"{W}.dataset.input_len=0"], f"{W}.dataset.input_len"),
    "output_len": ([f"{W}.dataset.output_len=0"], f"{W}.dataset.output_len"),
    "range_ratio": ([f"{W}.dataset.range_ratio=1.5"], f"{W}.dataset.range_ratio"),
    "longer than the model": ([f"{W}.dataset.input_len=5000"], f"{W}.dataset"),
    "jsonl without a path": ([f"{W}.dataset.kind=jsonl"], f"{W}.dataset.path"),
    "jsonl path missing": ([f"{W}.dataset.kind=jsonl", f"{W}.dataset.path=/no/such.jsonl"], f"{W}.dataset.path"),
    "arrival kind": ([f"{W}.arrival.kind=bursty"], f"{W}.arrival.kind"),
    "concurrency": ([f"{W}.arrival.concurrency=0"], f"{W}.arrival.concurrency"),
    "rate": ([f"{W}.arrival.kind=poisson"], f"{W}.arrival.rate"),
    "burstiness": ([f"{W}.arrival.kind=gamma", f"{W}.arrival.rate=2", f"{W}.arrival.burstiness=0"], f"{W}.arrival.burstiness"),
    "no stop condition": ([f"{W}.duration_s=null"], W),
    "num_requests": ([f"{W}.num_requests=0"], f"{W}.num_requests"),
    "warmup_requests": ([f"{W}.warmup_requests=-1"], f"{W}.warmup_requests"),
    "start_delay_s": ([f"{W}.start_delay_s=-1"], f"{W}.start_delay_s"),
    "active_thread_pct": ([f"{T}.share.active_thread_pct=101"], f"{T}.share.active_thread_pct"),
    "priority": ([f"{T}.share.priority=2"], f"{T}.share.priority"),
    "pinned_mem_limit": ([f"{T}.share.pinned_mem_limit=lots"], f"{T}.share.pinned_mem_limit"),
    "openai without url or launch": ([f"{T}.backend=openai"], f"{T}.openai"),
    "openai url": ([f"{T}.backend=openai", f"{T}.openai.url=ftp://x"], f"{T}.openai.url"),
    "unknown key added with +": ([f"+{W}.duraton_s=10"], f"{W}.duraton_s"),
    "rate on a closed loop": ([f"{W}.arrival.rate=4"], f"{W}.arrival.rate"),
    "more threads than cores": ([f"{T}.cpu_threads=4096"], f"{T}.cpu_threads"),
    "a tenant the experiment lacks": (["tenants.zz.max_batch=2"], "tenants.zz"),
    # Refused by Hydra while it composes the config; mt-run turns its message into one line.
    "wrong type": ([f"{T}.max_batch=abc"], f"{T}.max_batch"),
    "unknown key": ([f"{T}.no_such_key=1"], f"{T}.no_such_key"),
}


def refused(
    tmp_path: Path, env: dict[str, str], overrides: list[str], config: str = PAIR
) -> tuple[int, str, list[str], Path]:
    run_dir = tmp_path / "run"
    run = Watched(["--config-name", config, f"hydra.run.dir={run_dir}", *overrides], env, tmp_path)
    code, _, err = run.wait(60)
    return code, err, processes_left(run, None, tmp_path), run_dir


@pytest.mark.parametrize("overrides, field", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_bad_config_value_exits_2_with_one_line_naming_the_field(
    tmp_path: Path, mt_env: dict[str, str], fault: Callable[..., None], overrides: list[str], field: str
) -> None:
    code, err, left, run_dir = refused(tmp_path, mt_env, overrides)
    fault(processes_left=left, events_lost=0)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mt-run: error: {field}: "), err
    assert not run_dir.exists(), "nothing was started, not even a run folder"
    assert left == []


def test_a_gpu_experiment_without_a_gpu_exits_2_and_names_the_cpu_experiments(
    tmp_path: Path, mt_env: dict[str, str], fault: Callable[..., None]
) -> None:
    from multitenant.run.preflight import gpu_problem

    if gpu_problem(0) is None:
        pytest.skip("this machine has a usable GPU")
    code, err, left, run_dir = refused(tmp_path, mt_env, [], config="multitenant/pair_llama1b")
    fault(processes_left=left, events_lost=0)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "pair_llama1b needs a GPU (mode=mps, device=cuda:0) but" in lines[0], err
    assert "--config-name multitenant/pair_tiny" in lines[0]
    assert not run_dir.exists() and left == []


def test_printing_a_config_that_would_not_run_exits_2(
    tmp_path: Path, mt_env: dict[str, str], fault: Callable[..., None]
) -> None:
    # --cfg job prints the composed config and runs nothing; it still says the config is bad.
    code, err, left, run_dir = refused(tmp_path, mt_env, [f"{T}.max_batch=0", "--cfg", "job"])
    fault(processes_left=left, events_lost=0)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines == [
        "mt-run: error: the config printed above would not run: tenants.a.max_batch: must be >= 1 (got 0); "
        "set a positive batch limit"
    ], err
    assert not run_dir.exists() and left == []


MALFORMED = {
    "not JSON": (b'{"prompt_ids": [1, 2, 3], "output_len": 4}\n{"prompt_ids": [1, 2\n', ":2: not JSON"),
    "empty": (b"", "no requests in the file"),
    "ids out of the vocabulary": (b'{"prompt_ids": [1, 2, 99999999], "output_len": 4}\n', ":1: prompt_ids must be"),
    "no prompt": (b'{"output_len": 4}\n', ":1:"),
}


@pytest.mark.parametrize("content, needle", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_dataset_exits_2_before_anything_starts(
    tmp_path: Path, mt_env: dict[str, str], fault: Callable[..., None], content: bytes, needle: str
) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_bytes(content)
    code, err, left, run_dir = refused(tmp_path, mt_env, [f"{W}.dataset.kind=jsonl", f"{W}.dataset.path={data}"])
    fault(processes_left=left, events_lost=0)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mt-run: error: {W}.dataset.path: {data}"), err
    assert needle in lines[0], err
    assert not run_dir.exists()
    assert left == []


def test_truncated_events_file_is_analysed_with_a_warning(
    tmp_path: Path, mt_env: dict[str, str], fault: Callable[..., None]
) -> None:
    """A log cut short in the middle of a line (a full disk, a host crash): mt-analyze reads
    every whole line before the cut, warns about the rest, and counts only what it read.
    (tests/integration/test_analysis_cli.py covers a torn line appended to a complete log.)"""
    hand = Path(__file__).resolve().parents[1] / "data" / "analysis" / "hand"
    for run in ("pair", "solo_alpha", "solo_beta"):  # the pair and the baselines beside it
        shutil.copytree(hand / run, tmp_path / run)
    log = tmp_path / "pair" / "tenants" / "alpha" / "events.jsonl"
    raw = log.read_bytes()
    lines = raw.split(b"\n")
    cut = len(b"\n".join(lines[: len(lines) // 2])) + 1 + len(lines[len(lines) // 2]) // 2  # mid-line, mid-file
    log.write_bytes(raw[:cut])
    kept, torn = read_log(log)
    done_ok = sum(1 for e in kept if e["ev"] == "done" and e["status"] == "ok")
    res = mt_analyze(tmp_path / "pair", "--out", tmp_path / "out", env=mt_env)
    fault(processes_left=[], events_lost=0)
    assert torn == 1 and kept, "the cut left whole lines and one torn line"
    assert res.returncode == 0, res.stderr[-2000:]
    assert "alpha" in res.stderr and "truncated last line" in res.stderr, res.stderr[-2000:]
    summary = orjson.loads((tmp_path / "out" / "summary.json").read_bytes())["runs"][0]["tenants"]["alpha"]
    assert summary["requests"] <= done_ok, (summary["requests"], done_ok)
