"""Stage 1 of ``mt-analyze``: experiment folders -> columns in memory.

A run folder is recognised by its ``manifest.json`` (DESIGN.md, "Experiment folder"). For each
run this module reads the manifest, ``config.resolved.yaml``, every
``tenants/<name>/events.jsonl`` and ``telemetry.jsonl`` and keeps them as numpy columns:
nothing here computes a metric.

Speed: an events file is read as bytes, split on newlines and parsed with one ``orjson.loads``
per line while the cyclic garbage collector is paused (a million small dicts otherwise trigger
hundreds of useless collections and triple the time), except for ``tok`` lines in the exact
form ``EventWriter`` writes: those are rewritten into one number stream and parsed by numpy in
one call (``_parse_tok_block``), which is several times faster and gives identical columns.
``tok`` events' parallel ``rid``/``n`` lists become flat int64 arrays, one entry per (emission
instant, request). On machines with 4 or more cores several large files are parsed in worker
processes.

Damage: a truncated last line (what a killed writer leaves) is skipped with a warning; other
unreadable lines are skipped and counted in a warning; a second ``sent`` of a request is
ignored (the first is kept) and ``tok`` events of a request id with no sched/sent/done are
kept, each with a warning; nothing is dropped silently.
Times stay integer nanoseconds (int64) end to end: CLOCK_MONOTONIC values exceed 2**53 after
about 104 days of uptime, so float64 would lose nanoseconds.
"""

from __future__ import annotations

import gc
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from multitenant.schema import (
    DONE_ENGINE_FIELDS,
    DONE_USAGE_TOKENS,
    DONE_WARNING,
    EV_DONE,
    EV_ITER,
    EV_READY,
    EV_RUN_END,
    EV_RUN_START,
    EV_SCHED,
    EV_SENT,
    EV_TOK,
    EV_WINDOW,
    EVENT_SCHEMA_VERSION,
    MANIFEST_SCHEMA_VERSION,
)

MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "config.resolved.yaml"
TELEMETRY_NAME = "telemetry.jsonl"
EVENTS_NAME = "events.jsonl"

# Sentinel for "this timestamp / count was never logged". CLOCK_MONOTONIC is never negative.
NO_TIME = -1
# Several event files are parsed in worker processes when they are this big together and the
# machine has PARALLEL_MIN_CORES cores: on 2 cores the transfer back and the contention with
# the main process ate the gain (benchmarks/RESULTS.md), so there it parses serially.
PARALLEL_MIN_BYTES = 32 * 1024 * 1024
PARALLEL_MIN_CORES = 4

# Telemetry keys that hold one number per sample (INTERFACES.md, "telemetry.jsonl").
TELEMETRY_SCALARS = (
    "gpu_util_pct",
    "mem_util_pct",
    "mem_used_bytes",
    "power_w",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "temp_c",
)
# Telemetry keys that hold {tenant name: number}; flattened to "<key>/<tenant>" columns.
TELEMETRY_PER_TENANT = ("tenant_cpu_pct", "tenant_gpu_mem_bytes")


class AnalysisError(Exception):
    """Input that cannot be analysed: one line naming the problem and the fix (exit code 2)."""


@dataclass
class TenantLog:
    """One tenant's ``events.jsonl`` as columns.

    Requests: ``req_*`` arrays are aligned, one entry per request id, sorted by id; a time never
    logged is ``NO_TIME``, a count never logged is -1, a missing status is ``""``.
    Tokens: ``tok_*`` arrays are aligned, one entry per (emission instant, request) pair, in
    file order; ``tok_n`` is the number of tokens that request got at ``tok_t_ns``, ``tok_row``
    the request's index in the ``req_*`` arrays.
    Iterations (``task: forward``): ``iter_*`` arrays, one entry per ``iter`` event.
    Optional ``done`` fields (``multitenant.schema``): ``req_engine_*_ns`` are a serving engine's
    own timestamps (vLLM; same clock as ``t``), NO_TIME when not logged; ``req_usage_tokens``
    is the server's token count (openai), -1 when not logged; ``req_warning`` its one-line
    warning, None when there is none.
    """

    name: str
    events_path: Path | None
    run_start: dict[str, Any] | None = None
    ready: dict[str, Any] | None = None
    window_seen: bool = False
    window_t0_ns: int | None = None
    window_t1_ns: int | None = None
    run_end: dict[str, Any] | None = None
    req_rid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_sched_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_sent_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_done_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_n_in: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_n_out_target: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_n_out: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_status: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    req_error: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    req_engine_queued_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_engine_scheduled_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_engine_first_tok_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_engine_last_tok_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_usage_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    req_warning: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    tok_t_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tok_rid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tok_n: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tok_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # index into req_*
    iter_t_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    iter_batch: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    iter_dur_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lines_read: int = 0
    bytes_read: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def n_requests(self) -> int:
        return int(self.req_rid.size)

    # Compact pickling for the parse workers: token times run-length encoded (a line's requests
    # share its t), ids, counts and rows as int32 when they fit. Unpickling restores the very
    # same arrays; it only makes the trip from a worker process cheaper.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        t = state.pop("tok_t_ns")
        starts = np.flatnonzero(np.diff(t, prepend=t[:1] - 1)) if t.size else np.zeros(0, np.int64)
        state["_tok_t_runs"] = (t[starts], np.diff(np.append(starts, t.size)))
        for key in ("tok_rid", "tok_n", "tok_row"):
            arr = state[key]
            if arr.size and int(arr.min()) >= -(2**31) and int(arr.max()) < 2**31:
                state[key] = arr.astype(np.int32)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        values, counts = state.pop("_tok_t_runs")
        state["tok_t_ns"] = np.repeat(values, counts)
        for key in ("tok_rid", "tok_n", "tok_row"):
            state[key] = state[key].astype(np.int64, copy=False)
        self.__dict__.update(state)


@dataclass
class Telemetry:
    """``telemetry.jsonl`` as columns: ``t_ns`` (int64) and float64 columns (NaN = not sampled).

    Per-tenant values are flattened to ``"tenant_cpu_pct/<name>"`` and
    ``"tenant_gpu_mem_bytes/<name>"``.
    """

    t_ns: np.ndarray
    columns: dict[str, np.ndarray]
    warnings: list[str] = field(default_factory=list)

    def has(self, key: str) -> bool:
        col = self.columns.get(key)
        return col is not None and bool(np.isfinite(col).any())


@dataclass
class RunData:
    """Everything one run folder holds, read and checked."""

    run_dir: Path
    manifest: dict[str, Any]
    config: dict[str, Any] | None
    tenants: dict[str, TenantLog]
    telemetry: Telemetry | None
    warnings: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return str(self.manifest.get("run_id") or self.run_dir.name)

    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or (self.config or {}).get("name") or self.run_dir.parent.name)

    @property
    def status(self) -> str:
        return str(self.manifest.get("status") or "unknown")

    @property
    def mode(self) -> str | None:
        mode = self.manifest.get("mode") or (self.config or {}).get("mode")
        return None if mode is None else str(mode)

    @property
    def gpu_name(self) -> str | None:
        gpu = self.manifest.get("gpu")
        return gpu.get("name") if isinstance(gpu, dict) else None

    def tenant_config(self, name: str) -> dict[str, Any] | None:
        """The tenant's block of ``config.resolved.yaml`` (None without a config)."""
        if self.config is None:
            return None
        tenant = (self.config.get("tenants") or {}).get(name)
        return tenant if isinstance(tenant, dict) else None

    def tenant_manifest(self, name: str) -> dict[str, Any]:
        tenant = (self.manifest.get("tenants") or {}).get(name)
        return tenant if isinstance(tenant, dict) else {}

    def tenant_task(self, name: str) -> str:
        """``generate`` or ``forward``: from the config, else the manifest, else the events."""
        for source in (self.tenant_config(name), self.tenant_manifest(name)):
            if source and source.get("task"):
                return str(source["task"])
        log = self.tenants.get(name)
        if log is not None and log.iter_t_ns.size and not log.tok_t_ns.size:
            return "forward"
        return "generate"


# ---------------------------------------------------------------------------------------------
# Finding runs


def find_run_dirs(path: str | os.PathLike[str]) -> list[Path]:
    """Run folders at or below ``path`` (a folder is a run when it holds ``manifest.json``).

    A run's own sub-folders are not searched (a run never contains another run).
    """
    root = Path(path)
    if not root.exists():
        raise AnalysisError(f"{root} does not exist; pass a run folder, a sweep folder or a folder of runs")
    if not root.is_dir():
        raise AnalysisError(f"{root} is not a folder; pass the run folder that holds manifest.json")
    if (root / MANIFEST_NAME).is_file():
        return [root]
    runs: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        if MANIFEST_NAME in filenames:
            runs.append(Path(dirpath))
            dirnames.clear()  # do not descend into a run
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    if not runs:
        raise AnalysisError(
            f"{root} is not an experiment: no {MANIFEST_NAME} in it or below; "
            "pass a run folder written by mt-run (or a folder that contains such runs)"
        )
    return sorted(runs)


# ---------------------------------------------------------------------------------------------
# Manifest and config


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """Read and check ``manifest.json``; AnalysisError on damage or an unknown schema."""
    path = run_dir / MANIFEST_NAME
    try:
        manifest = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise AnalysisError(f"{path} is not valid JSON ({e}); restore the file or re-run the experiment") from None
    except OSError as e:
        raise AnalysisError(f"{path} cannot be read ({e.strerror}); check the path and its permissions") from None
    if not isinstance(manifest, dict):
        raise AnalysisError(f"{path} does not hold a JSON object; it is not a manifest written by mt-run")
    version = manifest.get("schema_version")
    if version != MANIFEST_SCHEMA_VERSION:
        raise AnalysisError(
            f"{path}: unknown schema_version {version!r} (this mt-analyze reads {MANIFEST_SCHEMA_VERSION}); "
            "analyse it with the multitenant version that wrote it"
        )
    return manifest


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """``config.resolved.yaml`` as a plain dict, or None when the run has none."""
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        return None
    from omegaconf import OmegaConf  # only here: half the start-up cost of the package otherwise

    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # omegaconf raises several yaml/omegaconf error types
        raise AnalysisError(f"{path} is not valid YAML ({e}); restore the file or re-run the experiment") from None
    if not isinstance(loaded, dict):
        raise AnalysisError(f"{path} does not hold a mapping; it is not a config written by mt-run")
    return {str(k): v for k, v in loaded.items()}


# ---------------------------------------------------------------------------------------------
# JSONL


def _split_jsonl(data: bytes, label: str, warnings: list[str]) -> tuple[list[bytes], Any]:
    """Whole lines of ``data`` and, when the last line has no newline, its parsed record.

    A last line without a newline is kept when it parses as a JSON object (then it is complete:
    a JSON object ends with its closing brace) and skipped with a warning otherwise.
    """
    tail_record = None
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        data = data[:cut]
        try:
            tail_record = orjson.loads(tail)
        except orjson.JSONDecodeError:
            tail_record = None
        if not isinstance(tail_record, dict):
            tail_record = None
            warnings.append(
                f"{label}: truncated last line ({len(tail)} bytes) skipped; the writer stopped mid-line"
            )
    lines = data.split(b"\n")
    lines.pop()  # the empty piece after the final newline
    return lines, tail_record


def _parse_lines(lines: list[bytes], label: str, warnings: list[str]) -> list[Any]:
    """One ``orjson.loads`` per line; on any bad line, a slow pass that skips and counts them."""
    loads = orjson.loads
    try:
        return [loads(line) for line in lines]
    except orjson.JSONDecodeError:
        pass
    records: list[Any] = []
    bad: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # a blank line is harmless
        try:
            records.append(loads(line))
        except orjson.JSONDecodeError:
            bad.append(number)
    if bad:
        warnings.append(
            f"{label}: {len(bad)} unreadable line(s) skipped (first: line {bad[0]}); the file is damaged"
        )
    return records


@dataclass
class _Columns:
    """What the dispatch loops collect before ``_finish`` turns it into arrays."""

    tok_t: list[Any] = field(default_factory=list)  # per emission line (ints, or int64 arrays)
    tok_len: list[Any] = field(default_factory=list)  # requests on that line
    tok_rid: list[Any] = field(default_factory=list)  # flat
    tok_n: list[Any] = field(default_factory=list)  # flat
    sched: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # rid -> (t, n_in, n_out_target)
    sent: dict[int, int] = field(default_factory=dict)  # the first sent of each request
    dup_sent: set[int] = field(default_factory=set)  # requests with more than one sent
    done: dict[int, tuple[int, int, str, str | None]] = field(default_factory=dict)
    # rid -> (engine_queued, engine_scheduled, engine_first_tok, engine_last_tok, usage_tokens,
    # warning), only for done events that carry at least one of these optional fields.
    done_extra: dict[int, tuple[int, int, int, int, int, str | None]] = field(default_factory=dict)
    bad_extra: int = 0  # done events whose optional fields were malformed (careful path only)
    iters: list[tuple[int, int, int]] = field(default_factory=list)
    blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


# The exact bytes EventWriter writes for a tok event: {"t":<int>,"ev":"tok","rid":[..],"n":[..]}
# The translate table below is built for the letters of "tok", schema v1's name for the kind.
_TOK_MARK = f'"ev":"{EV_TOK}"'.encode()
_TOK_SPLIT = b'],"n":['
# One translate pass turns the rest of a line into numbers: "{" -> "-" (so t becomes -t, the
# line's marker), the "k" of "tok" and each "[" -> "0" (a 0 field, and a harmless leading zero
# on the first id), the newline -> ","; the other structural bytes are deleted.
_TOK_TABLE = bytes.maketrans(b"{k[\n", b"-00,")
_TOK_DELETE = b'":tevorid]}'
_TOK_DELETED_PER_LINE = 21  # '"t":' 4 + '"ev":"to"' 9 ("k" stays) + '"rid":' 6 + "]}" 2


def _parse_tok_block(lines: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Canonical ``tok`` lines -> (t per line, requests per line, flat rid, flat n), all int64.

    Vectorised: the lines are rewritten into one comma-separated number stream,
    ``-<t>,0,<rid..>,-1,<n..>,`` per line, parsed by one ``np.fromstring`` and cut apart with
    index arithmetic (-1 and t > 1 cannot be confused: ids and counts are never negative).
    Every structural byte is accounted for (the exact number deleted, nothing but digits, commas
    and two minus signs per line left, the 0 placeholder in place, equal rid and n lists), so
    anything but the canonical form returns None and the caller parses with orjson instead.
    """
    n_lines = len(lines)
    empty = np.zeros(0, np.int64)
    if n_lines == 0:
        return empty, empty, empty, empty
    text = (b"\n".join(lines) + b"\n").replace(_TOK_SPLIT, b",-1,")
    before = len(text)
    text = text.translate(_TOK_TABLE, _TOK_DELETE)
    if (
        before - len(text) != _TOK_DELETED_PER_LINE * n_lines
        or text.translate(None, b"0123456789,-")
        or text.count(b"-") != 2 * n_lines
        or b",," in text
    ):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short read is caught by the size check below
        values = np.fromstring(text, dtype=np.int64, sep=",")
    if values.size != text.count(b","):
        return None
    head = np.flatnonzero(values < -1)
    split = np.flatnonzero(values == -1)
    if head.size != n_lines or split.size != n_lines or not bool(np.all(values[head + 1] == 0)):
        return None
    nxt = np.append(head[1:], values.size)
    n_rid = split - head - 2
    n_n = nxt - split - 1
    if not (np.array_equal(n_rid, n_n) and bool(np.all(n_rid >= 1))):
        return None
    t = -values[head]
    total = int(n_rid.sum())
    line_of = np.repeat(np.arange(n_lines), n_rid)
    within = np.arange(total) - np.repeat(np.cumsum(n_rid) - n_rid, n_rid)
    rid = values[head[line_of] + 2 + within]
    n = values[split[line_of] + 1 + within]
    return t, n_rid, rid, n


def _collect(records: list[Any], cols: _Columns, log: TenantLog, label: str) -> None:
    """Fast loop over parsed records; on any malformed record, redo them one by one."""
    snapshot = (len(cols.tok_t), len(cols.tok_rid), len(cols.iters), len(log.warnings))
    # sent keeps the first of each request, so it must be restored, not overwritten, on a redo.
    sent_before, dup_before = dict(cols.sent), set(cols.dup_sent)
    try:
        _collect_fast(records, cols, log)
        # The fast loop takes the lists as they come; only integers may become columns (numpy
        # would silently truncate 1.5 or turn True into 1).
        arrays = [np.asarray(x) for x in (cols.tok_t, cols.tok_len, cols.tok_rid, cols.tok_n)]
        if any(a.size and a.dtype.kind != "i" for a in arrays):
            raise ValueError("a tok field holds something other than integers")
        cols.tok_t, cols.tok_len, cols.tok_rid, cols.tok_n = arrays  # type: ignore[assignment]
    except (KeyError, TypeError, ValueError, AttributeError):
        # Undo the partial fast pass (lists back to their length, dicts are overwritten).
        del cols.tok_t[snapshot[0] :], cols.tok_len[snapshot[0] :]
        del cols.tok_rid[snapshot[1] :], cols.tok_n[snapshot[1] :], cols.iters[snapshot[2] :]
        del log.warnings[snapshot[3] :]
        cols.sent, cols.dup_sent = sent_before, dup_before
        _collect_careful(records, cols, log, label)


def _collect_fast(records: list[Any], cols: _Columns, log: TenantLog) -> None:
    """The common kinds inline (a function call per event costs as much as the event)."""
    t_append, len_append = cols.tok_t.append, cols.tok_len.append
    rid_extend, n_extend = cols.tok_rid.extend, cols.tok_n.extend
    sched, sent, done, done_extra = cols.sched, cols.sent, cols.done, cols.done_extra
    dup_sent = cols.dup_sent
    for r in records:
        ev = r["ev"]
        t = r["t"]
        if type(t) is not int:
            raise TypeError("t is not an integer")
        if ev == EV_TOK:
            rid = r["rid"]
            n = r["n"]
            if len(rid) != len(n):
                raise ValueError("rid and n differ in length")
            t_append(t)
            len_append(len(rid))
            rid_extend(rid)
            n_extend(n)
        elif ev == EV_SENT:
            rid = int(r["rid"])
            if rid in sent:
                dup_sent.add(rid)  # the first sent is kept
            else:
                sent[rid] = t
        elif ev == EV_SCHED:
            n_in, n_target = r.get("n_in"), r.get("n_out_target")
            sched[int(r["rid"])] = (t, -1 if n_in is None else int(n_in), -1 if n_target is None else int(n_target))
        elif ev == EV_DONE:
            n_out, error = r.get("n_out"), r.get("error")
            rid = int(r["rid"])
            done[rid] = (
                t,
                -1 if n_out is None else int(n_out),
                str(r["status"]),
                None if error is None else str(error),
            )
            extra, _ = _done_extra(r, strict=True)
            if extra is not None:
                done_extra[rid] = extra
            elif done_extra:
                done_extra.pop(rid, None)  # a later done of the same request replaces the earlier
        else:
            _apply_other(r, cols, log)


def _collect_careful(records: list[Any], cols: _Columns, log: TenantLog, label: str) -> None:
    """Record by record, skipping (and counting) those that do not follow schema v1."""
    bad = 0
    for r in records:
        try:
            if not isinstance(r, dict) or type(r.get("t")) is not int:
                raise ValueError("no integer t")
            if r.get("ev") == EV_TOK:
                rid, n = r["rid"], r["n"]
                if isinstance(rid, int) and isinstance(n, int):
                    rid, n = [rid], [n]  # tolerate a scalar form
                if len(rid) != len(n) or not all(type(x) is int for x in (*rid, *n)):
                    raise ValueError("bad tok lists")
                cols.tok_t.append(r["t"])
                cols.tok_len.append(len(rid))
                cols.tok_rid.extend(rid)
                cols.tok_n.extend(n)
            else:
                _apply_other(r, cols, log)
        except (KeyError, TypeError, ValueError, AttributeError):
            bad += 1
    if bad:
        log.warnings.append(f"{label}: {bad} event(s) that do not follow event schema v1 skipped")
    if cols.bad_extra:
        log.warnings.append(
            f"{label}: {cols.bad_extra} done event(s) with a malformed engine_*_ns, usage_tokens or warning "
            "field; those fields were ignored (engine times must be non-negative integer ns)"
        )


def _apply_other(r: dict[str, Any], cols: _Columns, log: TenantLog) -> None:
    ev = r["ev"]
    t = r["t"]
    if not isinstance(t, int):
        raise TypeError("t is not an integer")
    if ev == EV_SCHED:
        cols.sched[int(r["rid"])] = (t, _int_or(r.get("n_in"), -1), _int_or(r.get("n_out_target"), -1))
    elif ev == EV_SENT:
        rid = int(r["rid"])
        if rid in cols.sent:
            cols.dup_sent.add(rid)  # the first sent is kept
        else:
            cols.sent[rid] = t
    elif ev == EV_DONE:
        error = r.get("error")
        rid = int(r["rid"])
        cols.done[rid] = (t, _int_or(r.get("n_out"), -1), str(r["status"]), None if error is None else str(error))
        extra, bad = _done_extra(r, strict=False)
        cols.bad_extra += bad
        if extra is not None:
            cols.done_extra[rid] = extra
        else:
            cols.done_extra.pop(rid, None)
    elif ev == EV_ITER:
        cols.iters.append((t, int(r["batch"]), _int_or(r.get("dur_ns"), 0)))
    elif ev == EV_WINDOW:
        log.window_seen = True
        log.window_t0_ns = None if r.get("t0") is None else int(r["t0"])
        log.window_t1_ns = None if r.get("t1") is None else int(r["t1"])
    elif ev == EV_RUN_START:
        log.run_start = r
        schema = r.get("schema", EVENT_SCHEMA_VERSION)
        if schema != EVENT_SCHEMA_VERSION:
            raise _SchemaMismatch(schema)
    elif ev == EV_READY:
        log.ready = r
    elif ev == EV_RUN_END:
        log.run_end = r
    else:
        log.warnings.append(f"tenant {log.name}: event kind {ev!r} is not in schema v1 and was ignored")


def _int_or(value: Any, default: int) -> int:
    return default if value is None else int(value)


_DONE_EXTRA_INTS = (*DONE_ENGINE_FIELDS, DONE_USAGE_TOKENS)
_DoneExtra = tuple[int, int, int, int, int, str | None]


def _done_extra(r: dict[str, Any], strict: bool) -> tuple[_DoneExtra | None, int]:
    """A done event's optional fields: (engine queued, scheduled, first tok, last tok ns,
    usage_tokens, warning) with NO_TIME / -1 / None for those absent, or None when it has none;
    and 1 when a field was malformed (0 otherwise).

    A malformed field (an engine time or usage count that is not a non-negative integer, a
    warning that is not a string) raises TypeError when ``strict`` (the fast loop then hands
    the file to the careful one), else it is ignored and counted.
    """
    raw = [r.get(key) for key in _DONE_EXTRA_INTS]
    warning = r.get(DONE_WARNING)
    if warning is None and raw.count(None) == len(raw):
        return None, 0
    bad = 0
    ints: list[int] = []
    for key, value in zip(_DONE_EXTRA_INTS, raw, strict=True):
        if value is None:
            ints.append(-1)  # NO_TIME for the engine times, -1 for usage_tokens
        elif type(value) is int and value >= 0:
            ints.append(value)
        elif strict:
            raise TypeError(f"done.{key} is not a non-negative integer")
        else:
            ints.append(-1)
            bad = 1
    if warning is not None and not isinstance(warning, str):
        if strict:
            raise TypeError(f"done.{DONE_WARNING} is not a string")
        warning, bad = None, 1
    queued, scheduled, first, last, usage = ints
    return (queued, scheduled, first, last, usage, warning or None), bad


class _SchemaMismatch(Exception):
    """Raised through the dispatch loops (it is not one of the errors they catch)."""

    def __init__(self, schema: object) -> None:
        super().__init__(schema)
        self.schema = schema


def _finish(log: TenantLog, cols: _Columns) -> None:
    """Columns -> the TenantLog's arrays; request rows and each token's row."""
    t_parts = [np.asarray(cols.tok_t, dtype=np.int64)]
    len_parts = [np.asarray(cols.tok_len, dtype=np.int64)]
    rid_parts = [np.asarray(cols.tok_rid, dtype=np.int64)]
    n_parts = [np.asarray(cols.tok_n, dtype=np.int64)]
    for block_t, block_lens, block_rid, block_n in cols.blocks:
        t_parts.insert(0, block_t)  # the vectorised block holds the file's tok lines, in order
        len_parts.insert(0, block_lens)
        rid_parts.insert(0, block_rid)
        n_parts.insert(0, block_n)
    lens = np.concatenate(len_parts)
    log.tok_t_ns = np.repeat(np.concatenate(t_parts), lens)
    log.tok_rid = np.concatenate(rid_parts)
    log.tok_n = np.concatenate(n_parts)
    if cols.iters:
        it = np.asarray(cols.iters, dtype=np.int64)
        log.iter_t_ns, log.iter_batch, log.iter_dur_ns = it[:, 0].copy(), it[:, 1].copy(), it[:, 2].copy()
    # Every request id that appears anywhere, so a token of a request whose `sent` was lost
    # still has a row (and shows up as unfinished rather than vanishing).
    known = np.asarray(sorted(set(cols.sched) | set(cols.sent) | set(cols.done)), dtype=np.int64)
    rid = known
    if log.tok_rid.size:
        lo, hi = int(log.tok_rid.min()), int(log.tok_rid.max())
        contiguous = rid.size > 0 and int(rid[-1]) - int(rid[0]) == rid.size - 1
        if not (contiguous and lo >= rid[0] and hi <= rid[-1]):
            rid = np.union1d(rid, np.unique(log.tok_rid))
        # Ids are usually 0..N-1: then a token's row is an offset, no search needed.
        if int(rid[-1]) - int(rid[0]) == rid.size - 1:
            log.tok_row = np.subtract(log.tok_rid, rid[0])
        else:
            log.tok_row = np.searchsorted(rid, log.tok_rid)
    if rid.size > known.size:
        # tok events of requests with no sched, sent or done: a damaged log (lost lines). Their
        # tokens were emitted, so they stay (rows without times, counted in throughput).
        orphan = np.setdiff1d(rid, known, assume_unique=True)
        tokens = int(log.tok_n[np.isin(log.tok_rid, orphan)].sum())
        log.warnings.append(
            f"tenant {log.name}: tok events for {orphan.size} request id(s) ({tokens} token(s)) with no sched, "
            f"sent or done event (first: rid {int(orphan[0])}); the log is damaged: their tokens count in "
            "throughput, they are in no request count"
        )
    if cols.dup_sent:
        log.warnings.append(
            f"tenant {log.name}: {len(cols.dup_sent)} request(s) with more than one sent event "
            f"(first: rid {min(cols.dup_sent)}); the first sent is kept"
        )
    n = rid.size
    log.req_rid = rid
    sched = np.full(n, NO_TIME, np.int64)
    n_in = np.full(n, -1, np.int64)
    n_target = np.full(n, -1, np.int64)
    sent = np.full(n, NO_TIME, np.int64)
    done = np.full(n, NO_TIME, np.int64)
    n_out = np.full(n, -1, np.int64)
    status = np.full(n, "", dtype=object)
    error = np.full(n, None, dtype=object)
    if cols.sched:
        keys = np.fromiter(cols.sched.keys(), np.int64, len(cols.sched))
        vals = np.asarray(list(cols.sched.values()), dtype=np.int64)
        idx = np.searchsorted(rid, keys)
        sched[idx], n_in[idx], n_target[idx] = vals[:, 0], vals[:, 1], vals[:, 2]
    if cols.sent:
        keys = np.fromiter(cols.sent.keys(), np.int64, len(cols.sent))
        sent[np.searchsorted(rid, keys)] = np.fromiter(cols.sent.values(), np.int64, len(cols.sent))
    if cols.done:
        keys = np.fromiter(cols.done.keys(), np.int64, len(cols.done))
        idx = np.searchsorted(rid, keys)
        values = list(cols.done.values())
        done[idx] = [v[0] for v in values]
        n_out[idx] = [v[1] for v in values]
        status[idx] = [v[2] for v in values]
        error[idx] = [v[3] for v in values]
    extra_int = np.full((n, 5), -1, np.int64)  # NO_TIME == -1 for the engine times
    warning = np.full(n, None, dtype=object)
    if cols.done_extra:
        keys = np.fromiter(cols.done_extra.keys(), np.int64, len(cols.done_extra))
        idx = np.searchsorted(rid, keys)
        extras = list(cols.done_extra.values())
        extra_int[idx] = np.asarray([v[:5] for v in extras], dtype=np.int64)
        warning[idx] = [v[5] for v in extras]
    (log.req_engine_queued_ns, log.req_engine_scheduled_ns, log.req_engine_first_tok_ns,
     log.req_engine_last_tok_ns, log.req_usage_tokens) = (extra_int[:, i].copy() for i in range(5))  # fmt: skip
    log.req_warning = warning
    log.req_sched_ns, log.req_n_in, log.req_n_out_target = sched, n_in, n_target
    log.req_sent_ns, log.req_done_ns, log.req_n_out = sent, done, n_out
    log.req_status, log.req_error = status, error


def read_events(path: Path, name: str, label: str | None = None, vectorised: bool = True) -> TenantLog:
    """Parse one ``events.jsonl`` into a TenantLog (warnings in ``log.warnings``).

    ``vectorised``: parse canonical ``tok`` lines with ``_parse_tok_block`` (the result is
    identical to the orjson path, which tests check; False forces orjson for every line).
    """
    label = label or str(path)
    log = TenantLog(name=name, events_path=path)
    data = path.read_bytes()
    log.bytes_read = len(data)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # see the module docstring: collections are pure overhead while parsing
    try:
        lines, tail = _split_jsonl(data, label, log.warnings)
        del data
        cols = _Columns()
        block = None
        if vectorised:
            tok_lines: list[bytes] = []
            other_lines: list[bytes] = []
            add_tok, add_other = tok_lines.append, other_lines.append
            for line in lines:
                if _TOK_MARK in line:
                    add_tok(line)
                else:
                    add_other(line)
            # A tok event written some other way (spaces, another writer) would be parsed after the
            # block and so out of file order: then parse the whole file the general way.
            if f'"{EV_TOK}"'.encode() not in b"\n".join(other_lines):
                block = _parse_tok_block(tok_lines)
            del tok_lines
        if block is not None:
            cols.blocks.append(block)
            records = _parse_lines(other_lines, label, log.warnings)
            log.lines_read = len(records) + block[0].size
        else:
            records = _parse_lines(lines, label, log.warnings)
            log.lines_read = len(records)
        del lines
        if tail is not None:
            records.append(tail)
            log.lines_read += 1
        try:
            _collect(records, cols, log, label)
        except _SchemaMismatch as e:
            raise AnalysisError(
                f"{label}: unknown event schema {e.schema!r} (this mt-analyze reads {EVENT_SCHEMA_VERSION}); "
                "analyse it with the multitenant version that wrote it"
            ) from None
        del records
        _finish(log, cols)
    finally:
        if gc_was_enabled:
            gc.enable()
    return log


def read_telemetry(path: Path, label: str | None = None) -> Telemetry:
    """Parse ``telemetry.jsonl``; keys absent from every sample are simply not columns."""
    label = label or str(path)
    warnings: list[str] = []
    lines, tail = _split_jsonl(path.read_bytes(), label, warnings)
    records = [r for r in _parse_lines(lines, label, warnings) if isinstance(r, dict) and isinstance(r.get("t"), int)]
    if tail is not None and isinstance(tail.get("t"), int):
        records.append(tail)
    records.sort(key=lambda r: r["t"])
    t_ns = np.asarray([r["t"] for r in records], dtype=np.int64)
    columns: dict[str, np.ndarray] = {}
    for key in TELEMETRY_SCALARS:
        if any(key in r for r in records):
            columns[key] = np.asarray([_num(r.get(key)) for r in records], dtype=np.float64)
    for key in TELEMETRY_PER_TENANT:
        names = sorted({n for r in records if isinstance(r.get(key), dict) for n in r[key]})
        for tenant in names:
            columns[f"{key}/{tenant}"] = np.asarray(
                [_num((r.get(key) or {}).get(tenant)) for r in records], dtype=np.float64
            )
    return Telemetry(t_ns=t_ns, columns=columns, warnings=warnings)


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


# ---------------------------------------------------------------------------------------------
# Runs


def tenant_names(run_dir: Path, manifest: dict[str, Any], config: dict[str, Any] | None) -> list[str]:
    """Config order first (it is the order ``split`` uses), then the manifest, then folders."""
    names: list[str] = []
    for source in ((config or {}).get("tenants") or {}, manifest.get("tenants") or {}):
        for name in source:
            if str(name) not in names:
                names.append(str(name))
    tenants_dir = run_dir / "tenants"
    if tenants_dir.is_dir():
        for child in sorted(tenants_dir.iterdir()):
            if child.is_dir() and child.name not in names:
                names.append(child.name)
    return names


def _read_events_job(args: tuple[str, str, str]) -> TenantLog:
    path, name, label = args
    return read_events(Path(path), name, label)


def load_runs(
    run_dirs: Iterable[Path],
    progress: Callable[[int], None] | None = None,
    parallel: bool | None = None,
) -> list[RunData]:
    """Read several runs. ``progress(n_bytes)`` is called after each events file.

    ``parallel``: None = decide (worker processes when there is more than one events file,
    they exceed PARALLEL_MIN_BYTES together and the machine has PARALLEL_MIN_CORES cores).
    """
    heads: list[tuple[Path, dict[str, Any], dict[str, Any] | None, list[str]]] = []
    jobs: list[tuple[str, str, str]] = []
    for run_dir in run_dirs:
        manifest = read_manifest(run_dir)
        config = read_config(run_dir)
        names = tenant_names(run_dir, manifest, config)
        heads.append((run_dir, manifest, config, names))
        for name in names:
            path = run_dir / "tenants" / name / EVENTS_NAME
            if path.is_file():
                jobs.append((str(path), name, f"{run_dir.name}/tenants/{name}/{EVENTS_NAME}"))
    logs = _read_all(jobs, progress, parallel)

    runs: list[RunData] = []
    for run_dir, manifest, config, names in heads:
        warnings: list[str] = []
        tenants: dict[str, TenantLog] = {}
        for name in names:
            path = run_dir / "tenants" / name / EVENTS_NAME
            log = logs.get(str(path))
            if log is None:
                log = TenantLog(name=name, events_path=None)
                warnings.append(f"tenant {name}: no {EVENTS_NAME} in {run_dir / 'tenants' / name}; it logged nothing")
            warnings.extend(log.warnings)
            tenants[name] = log
        if config is None:
            warnings.append(f"no {CONFIG_NAME} in {run_dir}: solo baselines cannot be matched for this run")
        telemetry = None
        tpath = run_dir / TELEMETRY_NAME
        if tpath.is_file():
            telemetry = read_telemetry(tpath, f"{run_dir.name}/{TELEMETRY_NAME}")
            warnings.extend(telemetry.warnings)
        runs.append(RunData(run_dir, manifest, config, tenants, telemetry, warnings))
    return runs


def load_run(run_dir: str | os.PathLike[str], parallel: bool | None = None) -> RunData:
    """Read one run folder."""
    return load_runs([Path(run_dir)], parallel=parallel)[0]


def _read_all(
    jobs: list[tuple[str, str, str]], progress: Callable[[int], None] | None, parallel: bool | None
) -> dict[str, TenantLog]:
    sizes = [os.path.getsize(j[0]) for j in jobs]
    cores = os.cpu_count() or 1
    if parallel is None:
        parallel = len(jobs) > 1 and cores >= PARALLEL_MIN_CORES and sum(sizes) >= PARALLEL_MIN_BYTES
    out: dict[str, TenantLog] = {}
    if not parallel:
        for job, size in zip(jobs, sizes, strict=True):
            out[job[0]] = _read_events_job(job)
            if progress:
                progress(size)
        return out
    # fork is cheap and needs no re-import; elsewhere (macOS) spawn is the safe choice.
    ctx = get_context("fork" if sys.platform.startswith("linux") else "spawn")
    # Largest files first so the two cores finish together.
    order = sorted(range(len(jobs)), key=lambda i: -sizes[i])
    with ProcessPoolExecutor(max_workers=min(cores, len(jobs)), mp_context=ctx) as pool:
        futures = {i: pool.submit(_read_events_job, jobs[i]) for i in order}
        for i in order:
            try:
                out[jobs[i][0]] = futures[i].result()
            except AnalysisError:
                raise
            if progress:
                progress(sizes[i])
    return out


def find_beside(run_dir: Path, max_depth: int = 3) -> list[Path]:
    """Run folders near ``run_dir`` where a solo baseline usually lives.

    mt-run writes ``<output_root>/<name>/<timestamp>`` and, for sweeps,
    ``<output_root>/<name>/sweep-<timestamp>/job<N>`` (the sweep folder holds Hydra's
    ``multirun.yaml``). The search root is that ``<output_root>``: the run's grandparent, or its
    great-grandparent for a sweep job; it is searched ``max_depth`` folders deep.
    """
    run_dir = run_dir.resolve()
    root = run_dir.parent.parent
    if (run_dir.parent / "multirun.yaml").is_file():
        root = root.parent
    found: list[Path] = []
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if MANIFEST_NAME in filenames and here != run_dir:
            found.append(here)
            dirnames.clear()
            continue
        if len(here.parts) - base_depth >= max_depth:
            dirnames.clear()
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "tenants")
    return found
