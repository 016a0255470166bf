"""The run <-> analysis contract as analysis reads and writes it: the typed manifest, baseline
identities recorded by the run side, and summary.json as ``schema.Summary``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from multitenant.analysis.baselines import choose_baseline, tenant_spec
from multitenant.analysis.load import RunData, load_run
from multitenant.analysis.metrics import compute_run
from multitenant.analysis.names import LATENCY_METRICS
from multitenant.analysis.requests import latency_sample
from multitenant.analysis.summary import summary, write_summary_json
from multitenant.schema import SUMMARY_SCHEMA_VERSION, Manifest, RequestStatus, Summary, TenantSummary
from tests.unit.analysis.builders import RunBuilder, simple_run


def _run(root: Path, dirname: str, tenants: tuple[str, ...], identity: dict[str, Any] | None, **kw: Any) -> RunData:
    rb = RunBuilder(root, dirname)
    for name in tenants:
        rb.tenant(name, **kw).start(0).window(1000, 2000).request(1, 1000, 1000, [1100, 1200])
    run_dir = rb.write()
    if identity is not None:
        path = run_dir / "manifest.json"
        data = orjson.loads(path.read_bytes())
        for record in data["tenants"].values():
            record["identity"] = identity
        path.write_bytes(orjson.dumps(data))
    return load_run(run_dir)


def test_manifest_is_typed(tmp_path: Path) -> None:
    run = load_run(simple_run(tmp_path).write())
    assert isinstance(run.manifest, Manifest)
    assert run.tenant_manifest("a").load_s == 0.1
    assert run.tenant_manifest("nobody").identity is None


def test_recorded_identities_decide_when_both_runs_have_them(tmp_path: Path) -> None:
    same = {"model": "m", "backend": "hf", "options": {"k": 1}}
    co = _run(tmp_path, "pair", ("x", "y"), same)
    # The configs differ (dtype), the recorded identities agree: the records win.
    assert choose_baseline(co, "x", [_run(tmp_path, "solo1", ("a",), same, dtype="float16")]) is not None
    # The configs agree, the recorded identities differ.
    other = _run(tmp_path, "solo2", ("a",), {**same, "options": {"k": 2}})
    assert choose_baseline(co, "x", [other]) is None
    assert tenant_spec(co, "x") == same


def test_without_a_record_on_one_side_both_identities_come_from_the_configs(tmp_path: Path) -> None:
    co = _run(tmp_path, "pair", ("x", "y"), {"anything": "recorded"})
    assert choose_baseline(co, "x", [_run(tmp_path, "solo", ("a",), None)]) is not None


def test_latency_sample_is_ok_requests_sent_inside_the_window() -> None:
    sent = np.array([-1, 5, 10, 20, 21], np.int64)
    status = np.array([RequestStatus.OK, RequestStatus.OK, RequestStatus.ERROR, RequestStatus.OK, RequestStatus.OK], object)
    assert latency_sample(sent, status, (5, 20)).tolist() == [False, True, False, True, False]
    assert not latency_sample(sent, status, None).any()


def test_summary_json_is_a_typed_summary(tmp_path: Path) -> None:
    rm = compute_run(load_run(simple_run(tmp_path).write()))
    path = write_summary_json([rm], tmp_path / "summary.json")
    data = orjson.loads(path.read_bytes())
    assert list(data)[:2] == ["schema_version", "schema"] and data["schema_version"] == SUMMARY_SCHEMA_VERSION
    typed = Summary.from_json(data)
    assert data == summary([rm])
    assert dataclasses.asdict(typed)["runs"] == data["runs"]
    fields = {f.name for f in dataclasses.fields(TenantSummary)}
    assert {f"{m}_ms" for m in LATENCY_METRICS} <= fields
