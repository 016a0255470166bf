"""mt-analyze's command line: one PATH per --baseline, in any order with the PATHs."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from multitenant.analysis.cli import build_parser, main

HAND = Path(__file__).resolve().parents[2] / "data" / "analysis" / "hand"


@pytest.mark.parametrize(
    ("argv", "paths", "baselines"),
    [
        (["--baseline", "S", "RUN"], ["RUN"], ["S"]),
        (["RUN", "--baseline", "S"], ["RUN"], ["S"]),
        (["--baseline", "S1", "--baseline", "S2", "RUN"], ["RUN"], ["S1", "S2"]),
        (["RUN1", "--baseline", "S1", "RUN2", "--baseline", "S2"], ["RUN1", "RUN2"], ["S1", "S2"]),
    ],
)
def test_a_baseline_takes_one_path_and_repeats(argv: list[str], paths: list[str], baselines: list[str]) -> None:
    args = build_parser().parse_intermixed_args(argv)
    assert (args.paths, args.baseline) == (paths, baselines)


def test_baseline_before_the_run_and_repeated_uses_both_solos(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["--baseline", str(HAND / "solo_alpha"), "--baseline", str(HAND / "solo_beta"), str(HAND / "pair")]
    assert main([*argv, "--out", str(out)]) == 0
    run = orjson.loads((out / "summary.json").read_bytes())["runs"][0]
    assert run["missing_baselines"] == []
    assert all(t["baseline_run_dir"] for t in run["tenants"].values())


def test_help_says_one_path_per_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "one PATH per --baseline" in capsys.readouterr().out
