"""mt-run's argument rewriting for repeated trials and a sweep's exit code from manifests."""

from __future__ import annotations

import json

import pytest

from multitenant.cli import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    exit_code_from_manifests,
    with_trials,
)


def test_trials_become_the_outermost_sweep_override():
    args = ["-m", "--config-name", "multitenant/pair_tiny", "split=90/10,50/50", "trials=3"]
    assert with_trials(args) == [
        "-m", "--config-name", "multitenant/pair_tiny", "trial=range(0,3)", "split=90/10,50/50", "trials=3",
    ]  # fmt: skip


def test_trials_without_multirun_add_it():
    out = with_trials(["--config-name", "solo/tiny_llama", "trials=2"])
    assert out == ["-m", "--config-name", "solo/tiny_llama", "trial=range(0,2)", "trials=2"]


@pytest.mark.parametrize(
    "args",
    [
        ["--config-name", "solo/tiny_llama"],  # no trials
        ["--config-name", "solo/tiny_llama", "trials=1"],  # one trial: a plain run
        ["-m", "--config-name", "solo/tiny_llama", "trials=2", "trial=1"],  # the user's own trial
        ["--config-name", "solo/tiny_llama", "trials=x"],  # left for validation to name
    ],
)
def test_arguments_left_alone(args):
    assert with_trials(args) == args


def _job(sweep, name, status):
    d = sweep / name
    d.mkdir()
    if status is not None:
        (d / "manifest.json").write_text(json.dumps({"status": status}))


@pytest.mark.parametrize(
    ("statuses", "code"),
    [
        (["ok", "ok"], EXIT_OK),
        (["ok", "failed"], EXIT_FAILED),
        (["ok", "running"], EXIT_FAILED),  # the job's process died without ending its run
        (["interrupted", "failed"], EXIT_INTERRUPTED),
        ([None], EXIT_CONFIG),  # refused by validation: no manifest
    ],
)
def test_exit_code_from_manifests(tmp_path, statuses, code):
    for i, status in enumerate(statuses):
        _job(tmp_path, f"job{i}", status)
    (tmp_path / ".submitit").mkdir()  # the launcher's own folder is not a job
    assert exit_code_from_manifests(tmp_path) == code
