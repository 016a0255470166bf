"""Event writer: whole lines, background flush, fsync, and a readable prefix after SIGKILL."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from multitenant.events import EventLogError, EventWriter
from tests.event_checks import read_events


def test_lines_are_whole_json_in_order(tmp_path: Path) -> None:
    p = tmp_path / "events.jsonl"
    with EventWriter(p, background_flush=False) as w:
        w.emit("run_start", tenant="a", pid=1)
        for i in range(1000):
            w.emit("tok", t=1000 + i, rid=[i, i + 1], n=[1, 1])
    raw = p.read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.split(b"\n")[:-1]
    assert len(lines) == 1001
    recs = [orjson.loads(x) for x in lines]
    assert list(recs[1]) == ["t", "ev", "rid", "n"], "t and ev come first"
    assert [r["t"] for r in recs[1:]] == list(range(1000, 2000))


def test_idle_writer_is_flushed_by_the_background_thread(tmp_path: Path) -> None:
    p = tmp_path / "events.jsonl"
    w = EventWriter(p, flush_interval_s=0.2)
    w.emit("ready", load_s=1.0)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not p.read_bytes():
        time.sleep(0.05)
    assert p.read_bytes().count(b"\n") == 1, "an idle tenant's events reach the file without a new emit"
    w.close()


def test_truncated_last_line_is_skipped(tmp_path: Path) -> None:
    p = tmp_path / "events.jsonl"
    p.write_bytes(b'{"t":1,"ev":"run_start"}\n{"t":2,"ev":"tok","rid":[1],"n"')
    assert read_events(p) == [{"t": 1, "ev": "run_start"}]


WRITER_SCRIPT = r"""
import sys, time
from multitenant.events import EventWriter
w = EventWriter(sys.argv[1], flush_interval_s=0.05)
i = 0
while True:
    w.emit("tok", rid=[i], n=[1], pad="x" * 200)
    i += 1
    if i % 1000 == 0:
        print(i, flush=True)
"""


def test_survives_sigkill_with_a_readable_prefix(tmp_path: Path) -> None:
    p = tmp_path / "events.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(p)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for _ in range(20):  # at least 20k events emitted, several flushes done
        proc.stdout.readline()
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    recs = read_events(p)
    assert len(recs) >= 10000
    assert [r["rid"][0] for r in recs] == list(range(len(recs))), "a gap-free prefix"
    # Every byte up to the last newline is whole lines; nothing half-written in between.
    raw = p.read_bytes()
    assert raw.count(b"\n") == len(recs)


def _full_disk(w: EventWriter) -> None:
    """From now on every write of ``w``'s file fails with ENOSPC, as on a disk that filled up."""
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, w.fileno())
    os.close(full)


def test_a_failed_write_ends_the_log_and_the_next_emit_raises(tmp_path: Path) -> None:
    p = tmp_path / "events.jsonl"
    w = EventWriter(p, flush_interval_s=0.05)
    w.emit("run_start", tenant="a")
    w.flush()
    _full_disk(w)
    deadline = time.monotonic() + 5
    # The background flusher hits ENOSPC; the serving loop learns it at its next emit (the
    # flusher used to die silently while emit kept buffering until the tenant exited).
    with pytest.raises(EventLogError, match=r"events\.jsonl failed after 1 lines .*No space left on device"):
        while time.monotonic() < deadline:
            w.emit("tok", rid=[1], n=[1])
            time.sleep(0.01)
    assert w.error is not None and w.error.errno == errno.ENOSPC
    with pytest.raises(EventLogError):
        w.close()  # closes the file all the same
    assert w._closed
    assert read_events(p) == [{"t": read_events(p)[0]["t"], "ev": "run_start", "tenant": "a"}], "the prefix stays readable"


def test_a_failed_final_flush_is_raised_by_close(tmp_path: Path) -> None:
    w = EventWriter(tmp_path / "events.jsonl", background_flush=False)
    w.emit("run_start", tenant="a")
    _full_disk(w)
    with pytest.raises(EventLogError, match="No space left on device"):
        w.close()
