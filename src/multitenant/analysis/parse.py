"""The two JSONL parsers: ``events.jsonl`` -> ``TenantLog``, ``telemetry.jsonl`` -> ``Telemetry``.

Speed: an events file is read as bytes, split on newlines and parsed with one ``orjson.loads``
per line while the cyclic garbage collector is paused (a million small dicts otherwise trigger
hundreds of useless collections and triple the time), except for ``tok`` lines in the exact
form ``EventWriter`` writes: those are rewritten into one number stream and parsed by numpy in
one call (``tokblock.parse_tok_block``), which is several times faster and gives identical columns.
``tok`` events' parallel ``rid``/``n`` lists become flat int64 arrays, one entry per (emission
instant, request).

Damage: a truncated last line (what a killed writer leaves) is skipped with a warning; other
unreadable lines are skipped and counted in a warning; a second ``sent`` of a request is
ignored (the first is kept) and ``tok`` events of a request id with no sched/sent/done are
kept, each with a warning; nothing is dropped silently.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from multitenant.analysis.columns import (
    NO_TIME,
    TELEMETRY_PER_TENANT,
    TELEMETRY_SCALARS,
    AnalysisError,
    Telemetry,
    TenantLog,
)
from multitenant.analysis.tokblock import TOK_MARK, parse_tok_block
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
)

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

    ``vectorised``: parse canonical ``tok`` lines with ``tokblock.parse_tok_block`` (the result is
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
                if TOK_MARK in line:
                    add_tok(line)
                else:
                    add_other(line)
            # A tok event written some other way (spaces, another writer) would be parsed after the
            # block and so out of file order: then parse the whole file the general way.
            if f'"{EV_TOK}"'.encode() not in b"\n".join(other_lines):
                block = parse_tok_block(tok_lines)
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
