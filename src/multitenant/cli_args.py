"""mt-run's command line around Hydra: the arguments it adds (default folders, trials as the
outermost sweep axis), what it checks before Hydra composes (the experiment exists, no key given
twice, no run folder reused), the one-line errors for configs Hydra cannot compose, and the
usage that lists the experiments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def config_name_of(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg in ("--config-name", "-cn") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config-name="):
            return arg.split("=", 1)[1]
    return None


def existing_run_dir(argv: list[str]) -> Path | None:
    for arg in argv:
        if arg.startswith("hydra.run.dir="):
            d = Path(arg.split("=", 1)[1])
            if (d / "manifest.json").exists():
                return d
    return None


def is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def with_default_overrides(args: list[str]) -> list[str]:
    """``args`` with DEFAULT_HYDRA_OVERRIDES (those the user did not give) among the overrides.

    They go right after the user's last override, or after ``--config-name X`` when there is
    none: appended at the end they would become the value of a trailing ``--info`` (whose value
    is optional), and before the user's overrides argparse would reject those.
    """
    given = {a.split("=", 1)[0] for a in args if is_override(a)}
    defaults = [o for o in DEFAULT_HYDRA_OVERRIDES if o.split("=", 1)[0] not in given]
    at = len(args)
    overrides = [i for i, a in enumerate(args) if is_override(a)]
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
    values = [a.split("=", 1)[1] for a in args if is_override(a) and a.split("=", 1)[0].lstrip("+") == "trials"]
    if not values or any(is_override(a) and a.split("=", 1)[0].lstrip("+") == "trial" for a in args):
        return args
    if not values[-1].strip().isdigit():
        return args  # not a whole number: validation names it (exit 2)
    n = int(values[-1])
    if n <= 1:
        return args
    first = next(i for i, a in enumerate(args) if is_override(a))
    out = args[:first] + [f"trial=range(0,{n})"] + args[first:]
    if not any(a in ("-m", "--multirun") for a in out):
        out = ["-m", *out]
    return out


def hydra_error_line(exc: BaseException, config_dir: Path, config_name: str | None = None) -> str:
    """One line for a config Hydra could not compose: the field, the problem, the fix.

    Hydra wraps OmegaConf's error (which knows the full key) in its own; an unknown key gets
    the closest key of the schema, as a ``+key=value`` typo does in validation; a key under a
    tenant the experiment does not have names the tenants it has."""
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
    if (line := _missing_tenant_line(str(key or ""), cause, config_dir, config_name)) is not None:
        return line
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


def _missing_tenant_line(key: str, cause: BaseException, config_dir: Path, config_name: str | None) -> str | None:
    """``tenants.<name>: ...`` when ``<name>`` is not a tenant of the experiment, else None."""
    from multitenant.catalog import experiment_info

    parts = key.split(".")
    if config_name is None or len(parts) < 2 or parts[0] != "tenants":
        return None
    tenants = experiment_info(config_dir, config_name).tenants
    name = parts[1]
    if not tenants or name in tenants or f"'{name}'" not in str(cause):
        return None
    return (
        f"tenants.{name}: {config_name} has no tenant {name!r} (its tenants: {', '.join(tenants)}); "
        f"use one of those names, or add one with +tenant@tenants.{name}=<spec in configs/tenant/>"
    )


# Hydra's flags that print the composed config instead of running it.
PRINT_FLAGS = ("--cfg", "-c", "--resolve")


def config_problem(config_dir: Path, name: str, args: list[str]) -> str | None:
    """Why the experiment ``name`` with the command line's overrides would be refused (one
    line), or None: composed and validated the way a run is, nothing started."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from multitenant.config.compose import experiment_schema
    from multitenant.config.schema import ConfigError
    from multitenant.config.validate import unknown_key_error, validate

    overrides = [a for a in args if is_override(a) and not a.split("=", 1)[0].lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(version_base=None, config_dir=str(config_dir)):
            cfg = compose(config_name=name, overrides=overrides)
        if (err := unknown_key_error(cfg, experiment_schema())) is not None:
            return str(err)
        validate(OmegaConf.to_object(cfg))  # type: ignore[arg-type]
    except ConfigError as e:
        return str(e)
    except Exception as e:  # Hydra/OmegaConf: what the run itself would report
        return hydra_error_line(e, config_dir, name)
    return None


# Hydra's own flags that need no experiment config (help, completion).
NO_CONFIG_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc")


def usage(config_dir: Path) -> str:
    """A short usage with the experiment configs that exist and what each needs (what ``mt-run``
    alone prints)."""
    from multitenant.catalog import experiments

    infos = experiments(config_dir)
    width = max((len(i.name) for i in infos), default=0)
    return "\n".join(
        [
            "usage: mt-run --config-name EXPERIMENT [OVERRIDE ...]      one run",
            "       mt-run -m --config-name EXPERIMENT KEY=A,B [...]    a sweep (one run per value)",
            "e.g.   mt-run --config-name multitenant/pair_tiny tenants.a.workload.duration_s=10",
            f"experiments in {config_dir} (needs: GPU = an NVIDIA GPU, vLLM = bash scripts/setup.sh vllm):",
            *(f"  {i.name:<{width}}  {('needs ' + i.needs()) if i.needs() else 'runs on a CPU'}" for i in infos),
        ]
    )
