"""Invariants every tenant's events.jsonl must hold (shared by unit and integration tests)."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import orjson


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read an events file, skipping a truncated last line (what a crash can leave)."""
    out: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # a partial last line: the writer died mid-write
            out.append(orjson.loads(line))
    return out


def check_request_invariants(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Assert: t never decreases; each request has exactly one sched, sent and done, in that
    order; its tok counts add up to done.n_out; a request done ok got n_out_target tokens.
    Returns per request id: {"sched", "sent", "done": event, "tok": tokens received}."""
    ts = [e["t"] for e in events]
    assert ts == sorted(ts), "t never decreases within a file"
    per: dict[int, dict[str, Any]] = defaultdict(lambda: {"tok": 0})
    for e in events:
        if e["ev"] == "tok":
            for rid, n in zip(e["rid"], e["n"], strict=True):
                per[rid]["tok"] += n
        elif e["ev"] in ("sched", "sent", "done"):
            assert e["ev"] not in per[e["rid"]], f"request {e['rid']}: one {e['ev']}"
            per[e["rid"]][e["ev"]] = e
    for rid, r in per.items():
        assert "sched" in r and "sent" in r and "done" in r, f"request {rid}: every sent has a done"
        assert r["sched"]["t"] <= r["sent"]["t"] <= r["done"]["t"], f"request {rid}: sched <= sent <= done"
        assert r["tok"] == r["done"]["n_out"], f"request {rid}: tok counts equal n_out"
        if r["done"]["status"] == "ok":
            assert r["done"]["n_out"] == r["sched"]["n_out_target"], f"request {rid}: got its target"
    return per
