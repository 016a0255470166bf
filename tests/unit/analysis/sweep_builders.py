"""Sweep folders for the sweep tests: jobs whose throughput and SLO attainment are chosen by hand.

Each tenant of a job gets 10 requests, sent at 1000, 1200, ..., 2800 ms, inside the window
[1000, 3000] ms (2 s). Request r emits ``n_tok`` tokens at sent + TTFT and one more at sent + 200
(the last request's last token lands exactly on 3000, so the window is the full 2 s). TTFT is
20 ms, or 80 ms for the first ``slow`` requests. So, per tenant:
  throughput = 10 (n_tok + 1) / 2 s = 5 (n_tok + 1) tok/s
  SLO attainment under ttft=50ms = (10 - slow) / 10;  goodput = (10 - slow) / 2 s
and the run's aggregate throughput is the sum over its tenants.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import yaml

from tests.unit.analysis.builders import BASE_NS, RunBuilder

S = 1_000_000_000


def add_tenant(rb: RunBuilder, name: str, n_tok: int = 3, slow: int = 0) -> None:
    t = rb.tenant(name).start(0).ready(500).window(1000, 3000)
    for r in range(10):
        sent = 1000 + 200 * r
        ttft = 80 if r < slow else 20
        t.request(r + 1, sent, sent, [(sent + ttft, n_tok), (sent + 200, 1)])
    t.end(3100)


def job(
    root: Path,
    dirname: str,
    overrides: list[str],
    tenants: dict[str, tuple[int, int]],
    trial: int | None = None,
    trials: int | None = None,
    status: str = "ok",
    reason: str | None = None,
    host: str = "node1",
    started_ns: int = BASE_NS,
    ended_ns: int | None = None,
    started_wall: str = "2026-11-22T10:00:00+00:00",
    ended_wall: str | None = None,
    load_s: dict[str, float] | None = None,
    warmup_s: dict[str, float] | None = None,
    name: str = "pair",
) -> Path:
    """One sweep job: ``tenants`` maps a name to (n_tok, slow) (module docstring); ``trial``
    adds the ``trial=K`` override and config key, as mt-run writes them."""
    rb = RunBuilder(root, dirname, name=name, status=status, reason=reason, started_wall=started_wall)
    for tenant, (n_tok, slow) in tenants.items():
        add_tenant(rb, tenant, n_tok, slow)
    run_dir = rb.write()
    all_overrides = list(overrides)
    if trial is not None:
        all_overrides.append(f"trial={trial}")
    patch: dict[str, Any] = {
        "overrides": all_overrides,
        "host": {"hostname": host, "platform": "Linux", "python": "3.11", "cpu_count": 2},
        "started_ns": started_ns,
        "ended_ns": ended_ns,
        "ended_wall": ended_wall,
    }
    manifest = orjson.loads((run_dir / "manifest.json").read_bytes())
    manifest.update(patch)
    for tenant in tenants:
        manifest["tenants"][tenant]["load_s"] = (load_s or {}).get(tenant, 0.1)
        manifest["tenants"][tenant]["warmup_s"] = (warmup_s or {}).get(tenant, 0.1)
    (run_dir / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    config = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    if trial is not None:
        config["trial"] = trial
    if trials is not None:
        config["trials"] = trials
    (run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    hydra = run_dir / ".hydra"
    hydra.mkdir()
    (hydra / "overrides.yaml").write_text(yaml.safe_dump(all_overrides))
    return run_dir


def sweep_dir(root: Path, name: str = "sweep-20261122-100000") -> Path:
    """An empty sweep folder with Hydra's multirun.yaml."""
    d = root / name
    d.mkdir(parents=True)
    (d / "multirun.yaml").write_text("hydra: {}\n")
    return d


def solo(root: Path, tenant: str, n_tok: int) -> Path:
    """A solo baseline of ``tenant`` (same spec as the sweep's tenants) with throughput 5 (n_tok + 1)."""
    rb = RunBuilder(root / f"solo_{tenant}", "20261122-000000-000000", name=f"solo_{tenant}")
    add_tenant(rb, tenant, n_tok, 0)
    return rb.write()
