"""``mt-run``: one experiment (or a Hydra multirun sweep of them) from a config in configs/.

    mt-run --config-name multitenant/pair_tiny
    mt-run -m --config-name multitenant/pair_llama1b split=90/10,70/30,50/50

Exit codes: 0 every run ok; 1 a run failed; 2 bad configuration (nothing was started);
130 interrupted (Ctrl-C or SIGTERM). In a sweep a failed job does not stop the others; an
interrupted one stops the sweep.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from multitenant.cli_args import (
    NO_CONFIG_FLAGS,
    PRINT_FLAGS,
    config_name_of,
    config_problem,
    duplicate_key_error,
    existing_run_dir,
    hydra_error_line,
    usage,
    with_default_overrides,
    with_trials,
)
from multitenant.schema import Manifest, RunStatus

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130
# A run's manifest status -> mt-run's exit code (``running``: mt-run died without ending it).
STATUS_EXIT_CODES = {
    RunStatus.OK: EXIT_OK, RunStatus.FAILED: EXIT_FAILED, RunStatus.INTERRUPTED: EXIT_INTERRUPTED, RunStatus.RUNNING: EXIT_FAILED,
}
CONFIG_DIR_ENV = "MT_CONFIG_DIR"

_exit_codes: list[int] = []
_task_calls: list[str] = []  # one entry per job Hydra started
_job_status: list[tuple[Path, str]] = []  # (run dir, status) of every job that ran in this process
log = logging.getLogger("multitenant")


def find_config_dir() -> Path:
    """configs/ on the search path: $MT_CONFIG_DIR, ./configs, or the repository's configs/."""
    candidates = []
    if os.environ.get(CONFIG_DIR_ENV):
        candidates.append(Path(os.environ[CONFIG_DIR_ENV]))
    candidates.append(Path.cwd() / "configs")
    candidates.append(Path(__file__).resolve().parents[2] / "configs")  # editable install / checkout
    for c in candidates:
        if (c / "solo").is_dir() or (c / "multitenant").is_dir():
            return c.resolve()
    raise SystemExit(
        f"mt-run: error: no configs/ directory found (looked in {', '.join(str(c) for c in candidates)}); "
        f"run from the repository root or set {CONFIG_DIR_ENV}=/path/to/configs"
    )


def _fail_config(msg: str) -> None:
    print(f"mt-run: error: {msg}", file=sys.stderr, flush=True)
    _exit_codes.append(EXIT_CONFIG)


def _remove_empty_run_dir(run_dir: Path) -> None:
    """A config error must leave no half-made run behind (Hydra already made the folder)."""
    if run_dir.is_dir() and not (run_dir / "manifest.json").exists():
        leftovers = {p.name for p in run_dir.iterdir()}
        if leftovers <= {".hydra", "cli.log", "mt-run.log"}:
            shutil.rmtree(run_dir, ignore_errors=True)
            # Hydra made <output_root>/<name>/ for it too: gone as well if nothing else is there.
            for parent in (run_dir.parent, run_dir.parent.parent):
                with contextlib.suppress(OSError):
                    parent.rmdir()


def run_experiment_task(cfg: Any) -> int:
    """Hydra task function: convert the config once into typed objects, validate, then run one
    experiment in Hydra's output dir."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from multitenant.config.compose import experiment_schema
    from multitenant.config.schema import ConfigError
    from multitenant.config.validate import unknown_key_error, validate
    from multitenant.run.orchestrator import Orchestrator, RunFailed
    from multitenant.run.preflight import gpu_problem
    from multitenant.run.progress import LiveProgress

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    _task_calls.append(str(run_dir))
    try:
        if (err := unknown_key_error(cfg, experiment_schema())) is not None:
            raise err
        experiment = validate(OmegaConf.to_object(cfg))  # type: ignore[arg-type]
    except ConfigError as e:
        _fail_config(str(e))
        _remove_empty_run_dir(run_dir)
        return EXIT_CONFIG
    except Exception as e:  # OmegaConf: missing value, bad interpolation
        _fail_config(f"{type(e).__name__}: {str(e).splitlines()[0]}; fix the config or the override")
        _remove_empty_run_dir(run_dir)
        return EXIT_CONFIG
    if experiment.device_index is not None and (problem := gpu_problem(experiment.device_index)) is not None:
        _fail_config(
            f"{experiment.config.name} needs a GPU (mode={experiment.config.mode}, device={experiment.config.device}) "
            f"but {problem}; run it on a GPU machine, or run a CPU experiment here (mt-run alone lists them), "
            "e.g. --config-name multitenant/pair_tiny"
        )
        _remove_empty_run_dir(run_dir)
        return EXIT_CONFIG
    for warning in experiment.warnings:
        log.warning(warning)
    orch = Orchestrator(experiment, run_dir, sys.argv, list(hc.overrides.task))
    config = experiment.config
    title = f"{config.name} ({config.mode})" + (f" job {hc.job.num}" if hc.mode == RunMode.MULTIRUN else "")
    try:
        with LiveProgress(title, enabled=config.progress) as progress:
            orch.progress = progress
            status = orch.run()
            progress.finish(orch, status)
    except RunFailed as e:  # refused before anything started (existing run)
        _fail_config(str(e))
        return EXIT_CONFIG
    reason = orch.manifest.reason
    print(f"mt-run: {status}: {run_dir}" + (f" — {reason}" if reason else ""), file=sys.stderr, flush=True)
    code = STATUS_EXIT_CODES[status]
    _exit_codes.append(code)
    _job_status.append((run_dir, status))
    if status == RunStatus.INTERRUPTED:
        raise KeyboardInterrupt  # stop a sweep too; the run itself is already cleaned up
    return code


class _OutputThatNeverFails(io.TextIOBase):
    """A stdout/stderr whose reader may go away (``mt-run ... | head -1``, a closed terminal):
    once a write fails with a broken pipe, the stream's fd is pointed at /dev/null and every
    later write is dropped. Output is a courtesy; the run, its manifest and its exit code must
    not depend on it (a failed print must not stop a run or change how it is recorded)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._broken = False

    def _drop_if_gone(self, e: OSError) -> None:
        """Drop the stream if ``e`` says its reader is gone; re-raise anything else."""
        if not isinstance(e, BrokenPipeError) and e.errno not in (errno.EPIPE, errno.EIO):
            raise e
        self._drop()

    def _drop(self) -> None:
        self._broken = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())  # the interpreter's final flush lands there too
            os.close(devnull)
        except (OSError, ValueError):
            pass

    def write(self, text: str) -> int:
        if not self._broken:
            try:
                self._stream.write(text)
            except OSError as e:
                self._drop_if_gone(e)
        return len(text)

    def flush(self) -> None:
        if not self._broken:
            try:
                self._stream.flush()
            except OSError as e:
                self._drop_if_gone(e)

    def isatty(self) -> bool:
        return not self._broken and self._stream.isatty()

    def fileno(self) -> int:
        return int(self._stream.fileno())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self._stream, "encoding", "utf-8"))

    def writable(self) -> bool:
        return True


class SweepStatus(Callback):
    """A Hydra callback that notes the sweep folder, so the exit code of a sweep whose jobs ran
    in other processes (the submitit launchers) comes from the jobs' manifests."""

    sweep_dir: Path | None = None

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        SweepStatus.sweep_dir = Path(str(config.hydra.sweep.dir))


def exit_code_from_manifests(sweep_dir: Path) -> int:
    """The sweep's exit code from its jobs' manifest.json files (jobs run by another process).

    A job folder without a manifest was refused by validation (exit 2); ``running`` means the
    job's process died without ending its run (exit 1)."""

    codes = []
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        manifest = job / "manifest.json"
        if not manifest.is_file():
            continue
        status = Manifest.from_json(json.loads(manifest.read_text(encoding="utf-8"))).status
        codes.append(STATUS_EXIT_CODES.get(status, EXIT_FAILED))
    return max(codes) if codes else EXIT_CONFIG


def run_main() -> None:
    """Console entry point of ``mt-run``."""
    import hydra

    sys.stdout = _OutputThatNeverFails(sys.stdout)
    sys.stderr = _OutputThatNeverFails(sys.stderr)

    from multitenant.config.compose import register_configs

    if config_name_of(sys.argv[1:]) is None and not any(a in NO_CONFIG_FLAGS for a in sys.argv[1:]):
        # Without an experiment Hydra composes an empty config and fails on its first
        # interpolation with a long traceback: say what to run instead.
        print(f"mt-run: error: no experiment given (--config-name)\n{usage(find_config_dir())}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if (existing := existing_run_dir(sys.argv[1:])) is not None:
        print(
            f"mt-run: error: hydra.run.dir={existing} already holds a run (never overwritten); choose a new folder",
            file=sys.stderr,
        )
        sys.exit(EXIT_CONFIG)
    register_configs()
    config_dir = find_config_dir()
    name = config_name_of(sys.argv[1:])
    if name is not None:
        primary = config_dir / (name if name.endswith(".yaml") else f"{name}.yaml")
        if primary.is_file() and (err := duplicate_key_error(primary)) is not None:
            print(f"mt-run: error: {err}", file=sys.stderr)
            sys.exit(EXIT_CONFIG)
    sys.argv[1:] = with_default_overrides(with_trials(sys.argv[1:]))
    task = hydra.main(version_base=None, config_path=str(config_dir), config_name=None)(run_experiment_task)
    # Hydra prints a config it cannot compose in several lines; with HYDRA_FULL_ERROR it raises
    # instead, and the exception becomes one line here. A user who set it gets the traceback.
    user_wants_traceback = bool(os.environ.get("HYDRA_FULL_ERROR"))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        task()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        composing = isinstance(e, (HydraException, OmegaConfBaseException))  # not a harness bug
        if user_wants_traceback or not (composing or not _task_calls):
            raise
        # In a sweep, a later job's config can fail after earlier jobs ran: keep the worst code.
        print(f"mt-run: error: {hydra_error_line(e, config_dir, name)}", file=sys.stderr)
        sys.exit(max([EXIT_CONFIG, *_exit_codes]))
    except SystemExit as e:
        # Hydra reports a config it cannot compose (unknown key, wrong type, missing file) on
        # stderr and exits 1 before any job starts: that is a configuration error, exit 2.
        if e.code not in (0, None) and not _task_calls:
            sys.exit(EXIT_CONFIG)
        raise
    # --cfg/--resolve print the composed config and run nothing: still say whether it would run.
    printed = not _task_calls and name is not None and any(a in PRINT_FLAGS or a.startswith("--cfg=") for a in sys.argv[1:])
    if printed and name is not None and (problem := config_problem(config_dir, name, sys.argv[1:])) is not None:
        print(f"mt-run: error: the config printed above would not run: {problem}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    # Hydra instantiates the callback from its import path: under `python -m multitenant.cli`
    # that is another module object than this __main__, so read the class from there.
    from multitenant.cli import SweepStatus as callback

    if not _task_calls and callback.sweep_dir is not None and callback.sweep_dir.is_dir():
        code = exit_code_from_manifests(callback.sweep_dir)  # jobs ran elsewhere (a launcher)
        if code != EXIT_OK:
            print(f"mt-run: a job did not end ok; the launcher's job logs: {callback.sweep_dir / '.submitit'}", file=sys.stderr)
        sys.exit(code)
    if callback.sweep_dir is not None and _task_calls:
        print(sweep_line(callback.sweep_dir, _job_status, len(_task_calls)), file=sys.stderr, flush=True)
    sys.exit(max(_exit_codes) if _exit_codes else EXIT_OK)


def sweep_line(sweep_dir: Path, jobs: list[tuple[Path, str]], started: int) -> str:
    """The sweep's last line: its folder, how many jobs ended ok, and which did not."""
    ok = sum(1 for _, status in jobs if status == RunStatus.OK)
    others = [f"{run_dir.name} {status}" for run_dir, status in jobs if status != RunStatus.OK]
    refused = started - len(jobs)
    if refused:
        others.append(f"{refused} refused by validation")
    return f"mt-run: sweep {sweep_dir}: {ok}/{started} jobs ok" + (f" ({', '.join(others)})" if others else "")


if __name__ == "__main__":
    run_main()
