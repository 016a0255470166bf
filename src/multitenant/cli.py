"""``mt-run``: one experiment (or a Hydra multirun sweep of them) from a config in configs/.

    mt-run --config-name multitenant/pair_tiny
    mt-run -m --config-name multitenant/pair_llama1b split=90/10,70/30,50/50

Exit codes: 0 every run ok; 1 a run failed; 2 bad configuration (nothing was started);
130 interrupted (Ctrl-C or SIGTERM). In a sweep a failed job does not stop the others; an
interrupted one stops the sweep.
"""

from __future__ import annotations

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

from multitenant.schema import Manifest, RunStatus

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130
# A run's manifest status -> mt-run's exit code (``running``: mt-run died without ending it).
STATUS_EXIT_CODES = {
    RunStatus.OK: EXIT_OK, RunStatus.FAILED: EXIT_FAILED, RunStatus.INTERRUPTED: EXIT_INTERRUPTED, RunStatus.RUNNING: EXIT_FAILED,
}
CONFIG_DIR_ENV = "MT_CONFIG_DIR"

# Default layout of experiment folders; the user's own hydra.run.dir / hydra.sweep.dir win.
# Microseconds in the name: two runs started in the same second never share a folder.
DEFAULT_HYDRA_OVERRIDES = (
    "hydra.run.dir=${output_root}/${name}/${now:%Y%m%d-%H%M%S-%f}",
    "hydra.sweep.dir=${output_root}/${name}/sweep-${now:%Y%m%d-%H%M%S-%f}",
    # Job folders by number only: override values such as split=70/30 contain '/'.
    "hydra.sweep.subdir=job${hydra.job.num}",
    "hydra.job.name=mt-run",  # Hydra's own log: <run_dir>/mt-run.log
    "hydra/help=mt_run",  # --help says what modes, shares and workloads are (configs/hydra/help)
    # The sweep folder, for the exit code of jobs that ran in other processes (submitit).
    "+hydra.callbacks.mt_sweep_status._target_=multitenant.cli.SweepStatus",
)

_exit_codes: list[int] = []
_task_calls: list[str] = []  # one entry per job Hydra started
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
    if (warning := experiment.unapplied_shares_warning()) is not None:
        log.warning(warning)
    if experiment.share_pct_sum > 100:
        log.info(
            "active_thread_pct sums to %d%% over the tenants: these are caps, not reservations", experiment.share_pct_sum
        )
    orch = Orchestrator(experiment, run_dir, sys.argv, list(hc.overrides.task))
    config = experiment.config
    title = f"{config.name} ({config.mode})" + (f" job {hc.job.num}" if hc.mode == RunMode.MULTIRUN else "")
    try:
        with LiveProgress(title, enabled=config.progress) as progress:
            orch.progress = progress
            status = orch.run()
    except RunFailed as e:  # refused before anything started (existing run)
        _fail_config(str(e))
        return EXIT_CONFIG
    reason = orch.manifest.reason
    print(f"mt-run: {status}: {run_dir}" + (f" — {reason}" if reason else ""), file=sys.stderr, flush=True)
    code = STATUS_EXIT_CODES[status]
    _exit_codes.append(code)
    if status == RunStatus.INTERRUPTED:
        raise KeyboardInterrupt  # stop a sweep too; the run itself is already cleaned up
    return code


def duplicate_key_error(path: Path) -> str | None:
    """One line naming a key given twice in one mapping of ``path`` (e.g. two tenants both
    called ``a``), or None. YAML would keep only the last one; OmegaConf refuses with a
    traceback; this says which key, where, and what to do."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                where = "tenant name" if _is_tenants_block(node, key) else "key"
                raise ValueError(
                    f"{path}:{key_node.start_mark.line + 1}: {where} {key!r} appears twice "
                    f"(first on line {seen[key]}); give each its own name"
                )
            seen[key] = key_node.start_mark.line + 1
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    try:
        yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    except ValueError as e:
        return str(e)
    except yaml.YAMLError:
        return None  # other YAML problems: Hydra reports them with their position
    return None


def _is_tenants_block(node: Any, key: Any) -> bool:
    # Heuristic for the message only: tenant entries are mappings with a model or workload.
    return any(
        getattr(k, "value", None) == key and any(getattr(kk, "value", None) in ("model", "workload") for kk, _ in getattr(v, "value", []) or [])
        for k, v in node.value
    )


def _config_name(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg in ("--config-name", "-cn") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config-name="):
            return arg.split("=", 1)[1]
    return None


def _existing_run_dir(argv: list[str]) -> Path | None:
    for arg in argv:
        if arg.startswith("hydra.run.dir="):
            d = Path(arg.split("=", 1)[1])
            if (d / "manifest.json").exists():
                return d
    return None


class _OutputThatNeverFails(io.TextIOBase):
    """A stdout/stderr whose reader may go away (``mt-run ... | head -1``, a closed terminal):
    once a write fails with a broken pipe, the stream's fd is pointed at /dev/null and every
    later write is dropped. Output is a courtesy; the run, its manifest and its exit code must
    not depend on it (a failed print once stopped runs or recorded them wrongly)."""

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


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def with_default_overrides(args: list[str]) -> list[str]:
    """``args`` with DEFAULT_HYDRA_OVERRIDES (those the user did not give) among the overrides.

    They go right after the user's last override, or after ``--config-name X`` when there is
    none: appended at the end they would become the value of a trailing ``--info`` (whose value
    is optional), and before the user's overrides argparse would reject those.
    """
    given = {a.split("=", 1)[0] for a in args if _is_override(a)}
    defaults = [o for o in DEFAULT_HYDRA_OVERRIDES if o.split("=", 1)[0] not in given]
    at = len(args)
    overrides = [i for i, a in enumerate(args) if _is_override(a)]
    if overrides:
        at = overrides[-1] + 1
    else:
        for i, a in enumerate(args):
            if a in ("--config-name", "-cn") and i + 1 < len(args):
                at = i + 2
            elif a.startswith("--config-name="):
                at = i + 1
    return args[:at] + defaults + args[at:]


def with_trials(args: list[str]) -> list[str]:
    """``trials=N`` (N > 1) as a sweep: ``trial=range(0,N)`` becomes the first sweep override
    and ``-m`` is added if missing.

    Hydra's basic sweeper runs the product of the sweep overrides with the first one outermost,
    so with ``trial`` first every trial is one whole pass over the points (``split=90/10,50/50
    trials=2`` runs 90/10, 50/50, 90/10, 50/50): slow drift (clocks, temperature, a neighbour
    on the host) spreads over all points instead of landing on the last ones. ``trials`` itself
    stays an override, so it is in every job's config. A ``trial=`` the user gives is kept.
    """
    values = [a.split("=", 1)[1] for a in args if _is_override(a) and a.split("=", 1)[0].lstrip("+") == "trials"]
    if not values or any(_is_override(a) and a.split("=", 1)[0].lstrip("+") == "trial" for a in args):
        return args
    if not values[-1].strip().isdigit():
        return args  # not a whole number: validation names it (exit 2)
    n = int(values[-1])
    if n <= 1:
        return args
    first = next(i for i, a in enumerate(args) if _is_override(a))
    out = args[:first] + [f"trial=range(0,{n})"] + args[first:]
    if not any(a in ("-m", "--multirun") for a in out):
        out = ["-m", *out]
    return out


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


def hydra_error_line(exc: BaseException, config_dir: Path) -> str:
    """One line for a config Hydra could not compose: the field, the problem, the fix.

    Hydra wraps OmegaConf's error (which knows the full key) in its own; an unknown key gets
    the closest key of the schema, as a ``+key=value`` typo does in validation."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    from multitenant.config.compose import experiment_schema
    from multitenant.config.validate import unknown_key_error

    if isinstance(exc, OverrideParseException):
        return f"cannot parse the override {exc.override!r}: {str(exc).strip().splitlines()[0]}; quote it or fix its syntax"
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        return f"no config {exc.missing_cfg_file!r} under {config_dir}; run mt-run alone to list the experiments"
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
        node: dict[str, Any] = {}
        leaf = node
        for part in str(key).split(".")[:-1]:
            leaf = leaf.setdefault(part, {})
        leaf[str(key).split(".")[-1]] = None
        if (err := unknown_key_error(node, experiment_schema())) is not None:
            return str(err)
    if isinstance(cause, OmegaConfBaseException) and key:
        msg = str(getattr(cause, "msg", "") or cause).strip().splitlines()[0]
        return f"{key}: {msg} ({first.lower()}); give it a value of the field's type"
    return f"{first}; fix the config or the override"


# Hydra's own flags that need no experiment config (help, completion).
_NO_CONFIG_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc")


def usage(config_dir: Path) -> str:
    """A short usage with the experiment configs that exist (what ``mt-run`` alone prints)."""
    names = sorted(
        f"{group}/{p.stem}" for group in ("solo", "multitenant") for p in (config_dir / group).glob("*.yaml")
    )
    return "\n".join(
        [
            "usage: mt-run --config-name EXPERIMENT [OVERRIDE ...]      one run",
            "       mt-run -m --config-name EXPERIMENT KEY=A,B [...]    a sweep (one run per value)",
            "e.g.   mt-run --config-name multitenant/pair_tiny tenants.a.workload.duration_s=10",
            f"experiments in {config_dir}:",
            *(f"  {n}" for n in names),
        ]
    )


def run_main() -> None:
    """Console entry point of ``mt-run``."""
    import hydra

    sys.stdout = _OutputThatNeverFails(sys.stdout)
    sys.stderr = _OutputThatNeverFails(sys.stderr)

    from multitenant.config.compose import register_configs

    if _config_name(sys.argv[1:]) is None and not any(a in _NO_CONFIG_FLAGS for a in sys.argv[1:]):
        # Without an experiment Hydra composes an empty config and fails on its first
        # interpolation with a long traceback: say what to run instead.
        print(f"mt-run: error: no experiment given (--config-name)\n{usage(find_config_dir())}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if (existing := _existing_run_dir(sys.argv[1:])) is not None:
        print(
            f"mt-run: error: hydra.run.dir={existing} already holds a run (never overwritten); choose a new folder",
            file=sys.stderr,
        )
        sys.exit(EXIT_CONFIG)
    register_configs()
    config_dir = find_config_dir()
    name = _config_name(sys.argv[1:])
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
        print(f"mt-run: error: {hydra_error_line(e, config_dir)}", file=sys.stderr)
        sys.exit(max([EXIT_CONFIG, *_exit_codes]))
    except SystemExit as e:
        # Hydra reports a config it cannot compose (unknown key, wrong type, missing file) on
        # stderr and exits 1 before any job starts: that is a configuration error, exit 2.
        if e.code not in (0, None) and not _task_calls:
            sys.exit(EXIT_CONFIG)
        raise
    # Hydra instantiates the callback from its import path: under `python -m multitenant.cli`
    # that is another module object than this __main__, so read the class from there.
    from multitenant.cli import SweepStatus as callback

    if not _task_calls and callback.sweep_dir is not None and callback.sweep_dir.is_dir():
        code = exit_code_from_manifests(callback.sweep_dir)  # jobs ran elsewhere (a launcher)
        if code != EXIT_OK:
            print(f"mt-run: a job did not end ok; the launcher's job logs: {callback.sweep_dir / '.submitit'}", file=sys.stderr)
        sys.exit(code)
    sys.exit(max(_exit_codes) if _exit_codes else EXIT_OK)


if __name__ == "__main__":
    run_main()
