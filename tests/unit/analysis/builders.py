"""Write complete run folders (the experiment-folder contract of docs/design.md) for analysis tests.

``RunBuilder`` lays out manifest.json, config.resolved.yaml, tenants/<name>/events.jsonl and,
optionally, telemetry.jsonl. Events are written with the project's own ``EventWriter`` so the
bytes are what a real tenant writes. Times are given in milliseconds after ``BASE_NS`` (odd and
above 2**53 on purpose: float64 cannot hold such a time to the nanosecond, so any float
shortcut in the analysis shows up as a wrong last digit).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from multitenant.events import EventWriter
from multitenant.schema import DONE_ENGINE_FIELDS

BASE_NS = 10_000_000_000_000_001
MS = 1_000_000

EVENT_ORDER = {"run_start": 0, "ready": 1, "window": 2, "sched": 3, "sent": 4, "tok": 5, "iter": 5, "done": 6, "run_end": 9}

GPU = {
    "index": 0,
    "name": "NVIDIA H100 80GB HBM3",
    "uuid": "GPU-test",
    "sm_count": 132,
    "memory_total_bytes": 85520809984,
    "driver_version": "560.35.03",
    "cuda_driver_version": 12060,
    "compute_mode": "Default",
    "mig_mode": None,
    "persistence_mode": "Enabled",
}


def t_ns(ms: float) -> int:
    """BASE_NS + ms, exactly (ms may have up to 6 decimals)."""
    return BASE_NS + round(ms * MS)


def default_workload(**overrides: Any) -> dict[str, Any]:
    wl: dict[str, Any] = {
        "dataset": {"kind": "random", "input_len": 16, "output_len": 4, "range_ratio": 0.0, "path": None, "seed": 0},
        "arrival": {"kind": "closed", "concurrency": 1, "rate": None, "burstiness": 1.0, "seed": 0},
        "num_requests": None,
        "duration_s": 2.0,
        "warmup_requests": 1,
        "start_delay_s": 0.0,
    }
    wl.update(overrides)
    return wl


@dataclass
class TenantBuilder:
    name: str
    model: str = "synthetic:llama-tiny"
    task: str = "generate"
    dtype: str = "float32"
    execution: str = "eager"
    backend: str = "hf"
    max_batch: int = 8
    cpu_threads: int | None = None  # written to the config when set
    workload: dict[str, Any] = field(default_factory=default_workload)
    share: dict[str, Any] = field(default_factory=lambda: {"active_thread_pct": None, "pinned_mem_limit": None, "priority": None})
    events: list[dict[str, Any]] = field(default_factory=list)
    write_events: bool = True
    # Backend option blocks of config.resolved.yaml; None leaves the block out (as run folders
    # written before the vllm and openai backends existed do).
    vllm: dict[str, Any] | None = None
    openai: dict[str, Any] | None = None

    def ev(self, ms: float, ev: str, **fields: Any) -> TenantBuilder:
        self.events.append({"t": t_ns(ms), "ev": ev, **fields})
        return self

    def start(self, ms: float = 0.0, schema: int = 1) -> TenantBuilder:
        return self.ev(ms, "run_start", tenant=self.name, backend=self.backend, model=self.model, pid=1, wall_ns=0, schema=schema)

    def ready(self, ms: float) -> TenantBuilder:
        return self.ev(ms, "ready", load_s=0.1, warmup_s=0.1, pid=1, sms=None, device="cpu")

    def window(self, t0_ms: float, t1_ms: float | None, at_ms: float | None = None) -> TenantBuilder:
        at = t0_ms - 10 if at_ms is None else at_ms
        return self.ev(at, "window", t0=t_ns(t0_ms), t1=None if t1_ms is None else t_ns(t1_ms))

    def request(
        self,
        rid: int,
        sched: float,
        sent: float | None,
        toks: list[tuple[float, int]] | list[float],
        status: str | None = "ok",
        done: float | None = None,
        n_out: int | None = None,
        error: str | None = None,
        done_fields: dict[str, Any] | None = None,
    ) -> TenantBuilder:
        """A request: sched, sent, one tok per (ms, n) (or per ms with n=1), then done.

        ``status=None`` leaves out the ``done`` event (a request cut short by a crash);
        ``done_fields`` are added to it as they are (engine_*_ns, usage_tokens, warning).
        """
        pairs = [(t, 1) if isinstance(t, (int, float)) else t for t in toks]
        self.ev(sched, "sched", rid=rid, n_in=16, n_out_target=max(1, sum(n for _, n in pairs)))
        if sent is not None:
            self.ev(sent, "sent", rid=rid)
        for ms, n in pairs:
            self.ev(ms, "tok", rid=[rid], n=[n])
        if status is not None:
            end = done if done is not None else (pairs[-1][0] if pairs else (sent if sent is not None else sched))
            fields: dict[str, Any] = {"rid": rid, "n_out": sum(n for _, n in pairs) if n_out is None else n_out, "status": status}
            if error is not None:
                fields["error"] = error
            fields.update(done_fields or {})
            self.ev(end, "done", **fields)
        return self

    def end(self, ms: float, status: str = "ok") -> TenantBuilder:
        return self.ev(ms, "run_end", status=status, counts={})

    def config(self) -> dict[str, Any]:
        cfg = {
            "backend": self.backend,
            "model": self.model,
            "dtype": self.dtype,
            "task": self.task,
            "execution": self.execution,
            "max_batch": self.max_batch,
            "device": "cpu",
            "workload": copy.deepcopy(self.workload),
            "share": dict(self.share),
        }
        if self.cpu_threads is not None:
            cfg["cpu_threads"] = self.cpu_threads
        for block in ("vllm", "openai"):
            if getattr(self, block) is not None:
                cfg[block] = copy.deepcopy(getattr(self, block))
        return cfg

    def sorted_events(self) -> list[dict[str, Any]]:
        """Events in file order (by t), with tok events of one instant merged into one line as
        a real tenant writes them (parallel rid/n lists)."""
        ordered = sorted(enumerate(self.events), key=lambda ie: (ie[1]["t"], EVENT_ORDER.get(ie[1]["ev"], 5), ie[0]))
        out: list[dict[str, Any]] = []
        for _, e in ordered:
            prev = out[-1] if out else None
            if e["ev"] == "tok" and prev is not None and prev["ev"] == "tok" and prev["t"] == e["t"]:
                prev["rid"] = prev["rid"] + e["rid"]
                prev["n"] = prev["n"] + e["n"]
            else:
                out.append(copy.deepcopy(e))
        return out


@dataclass
class RunBuilder:
    """A run folder under ``root / dirname``."""

    root: Path
    dirname: str = "run"
    name: str = "test_run"
    mode: str = "cpu"
    gpu: dict[str, Any] | None = None
    status: str = "ok"
    reason: str | None = None
    schema_version: int = 1
    started_wall: str = "2026-11-22T10:00:00+00:00"
    write_config: bool = True
    tenants: dict[str, TenantBuilder] = field(default_factory=dict)
    telemetry: list[dict[str, Any]] | None = None

    def tenant(self, name: str, **kwargs: Any) -> TenantBuilder:
        tb = TenantBuilder(name=name, **kwargs)
        self.tenants[name] = tb
        return tb

    @property
    def run_dir(self) -> Path:
        return self.root / self.dirname

    def write(self) -> Path:
        d = self.run_dir
        d.mkdir(parents=True, exist_ok=False)
        cfg = {
            "name": self.name,
            "mode": self.mode,
            "device": "cpu" if self.mode == "cpu" else "cuda:0",
            "output_root": "experiments",
            "split": None,
            "tenants": {n: tb.config() for n, tb in self.tenants.items()},
        }
        if self.write_config:
            (d / "config.resolved.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        manifest = {
            "schema_version": self.schema_version,
            "run_id": f"{self.name}-{self.dirname}",
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "host": {"hostname": "test", "platform": "Linux", "python": "3.11", "cpu_count": 2},
            "gpu": self.gpu,
            "packages": {},
            "mode": self.mode,
            "mps": None,
            "tenants": {
                n: {
                    "pid": 1,
                    "backend": tb.backend,
                    "model": tb.model,
                    "task": tb.task,
                    "execution": tb.execution,
                    "dtype": tb.dtype,
                    "max_batch": tb.max_batch,
                    "device": "cpu",
                    "share": dict(tb.share),
                    "share_applied": False,
                    "effective_sms": None,
                    "mps_attached": None,
                    "exit_code": 0,
                    "load_s": 0.1,
                    "warmup_s": 0.1,
                }
                for n, tb in self.tenants.items()
            },
            "window": {"t0_ns": None, "t1_ns": None},
            "started_wall": self.started_wall,
            "ended_wall": None,
            "started_ns": BASE_NS,
            "ended_ns": None,
            "argv": [],
            "overrides": [],
        }
        (d / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        for name, tb in self.tenants.items():
            if not tb.write_events:
                continue
            with EventWriter(d / "tenants" / name / "events.jsonl", background_flush=False) as w:
                for e in tb.sorted_events():
                    fields = {k: v for k, v in e.items() if k not in ("t", "ev")}
                    w.emit(e["ev"], e["t"], **fields)
        if self.telemetry is not None:
            with open(d / "telemetry.jsonl", "wb") as f:
                for sample in self.telemetry:
                    f.write(orjson.dumps(sample) + b"\n")
        return d


def simple_run(root: Path, dirname: str = "run", **kwargs: Any) -> RunBuilder:
    """One generate tenant 'a' with a window [1000, 3000] ms and three requests."""
    rb = RunBuilder(root, dirname, **kwargs)
    a = rb.tenant("a")
    a.start(0).request(0, 100, 100, [150, 170]).ready(200).window(1000, 3000)
    a.request(1, 1000, 1000, [1010, 1020, 1030])
    a.request(2, 1100, 1100, [1150, 1200])
    a.request(3, 1300, 1300, [1400, 2000, 2999])
    a.end(3100)
    return rb


def engine_times(queued: float, scheduled: float, first: float, last: float) -> dict[str, int]:
    """A vLLM tenant's ``done`` engine fields, each given in ms after BASE_NS like every time here."""
    return dict(zip(DONE_ENGINE_FIELDS, (t_ns(queued), t_ns(scheduled), t_ns(first), t_ns(last)), strict=True))
