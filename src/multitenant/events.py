"""Per-tenant event log, schema v1 (docs/design.md, "The event log").

One JSON object per line: ``{"t": <int ns of time.monotonic_ns()>, "ev": <kind>, ...fields}``.
``t`` is CLOCK_MONOTONIC, shared by every process of one host, so the logs of co-located
tenants line up without any clock synchronisation.

Cost model: ``emit`` serialises with orjson into an in-memory list (about a microsecond) and
never touches the file: a background thread writes whole lines in one ``os.write`` when the
buffer is large (``emit`` wakes it) or the last flush is older than ``flush_interval_s``, so
the serving loop never waits for the disk. ``close`` flushes and fsyncs. A process killed with SIGKILL therefore leaves every line it
flushed, and at worst loses the last ``flush_interval_s`` of events, never half a line of an
earlier flush (``os.write`` of one buffer to a regular file is not interleaved with ours).

A write that fails (a full disk, a removed folder) ends the log: the error is kept, the
flusher stops, and the next ``emit`` raises it as ``EventLogError``, so the tenant fails at
once with the cause instead of serving on while nothing reaches the file and the buffer grows
until the tenant exits. Lines written before the failure stay readable.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import orjson

# Event kinds, statuses and the schema version live in multitenant.schema (shared with analysis).


class EventLogError(OSError):
    """Writing the events file failed; the log ends at the lines written before."""


class EventWriter:
    """Buffered, line-atomic JSONL writer for one tenant's ``events.jsonl``.

    ``emit`` is meant for one thread (the tenant loop); the internal lock guards the buffer
    swap against the background flusher. Without ``background_flush`` (tests, benchmarks)
    ``emit`` writes a due buffer itself.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        flush_interval_s: float = 1.0,
        max_buffered_lines: int = 8192,
        background_flush: bool = True,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND|O_EXCL-free: a run dir is fresh, but reopening (e.g. after a crash) appends.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lines: list[bytes] = []
        self._lock = threading.Lock()
        self._flush_interval_ns = int(flush_interval_s * 1e9)
        self._max_lines = max_buffered_lines
        self._last_flush_ns = time.monotonic_ns()
        self._closed = False
        self.lines_written = 0
        self.error: EventLogError | None = None  # the write that ended the log, if one failed
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by emit when a flush is due
        self._thread: threading.Thread | None = None
        if background_flush:
            self._thread = threading.Thread(target=self._flush_loop, name="event-flusher", daemon=True)
            self._thread.start()

    def emit(self, ev: str, t: int | None = None, **fields: Any) -> int:
        """Append one event; returns its ``t`` (now, unless given). Fields keep their order.
        Raises ``EventLogError`` once a write of the file has failed."""
        if self.error is not None:
            raise self.error
        if t is None:
            t = time.monotonic_ns()
        record: dict[str, Any] = {"t": t, "ev": ev}
        record.update(fields)
        line = orjson.dumps(record) + b"\n"
        with self._lock:
            self._lines.append(line)
            due = len(self._lines) >= self._max_lines or t - self._last_flush_ns >= self._flush_interval_ns
        if due:
            if self._thread is not None:
                self._wake.set()
            else:
                self.flush()
        return t

    def flush(self) -> None:
        """Write every buffered line, whole, in one system call. Raises ``EventLogError`` if
        the write fails (then and on every later call)."""
        with self._lock:
            if self.error is not None:
                raise self.error
            if not self._lines or self._closed:
                self._last_flush_ns = time.monotonic_ns()
                return
            data = b"".join(self._lines)
            self._lines = []
            self._last_flush_ns = time.monotonic_ns()
            view = memoryview(data)
            try:
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
            except OSError as e:
                written = data[: len(data) - len(view)].count(b"\n")
                unwritten = data.count(b"\n") - written
                self.lines_written += written
                self.error = EventLogError(
                    e.errno,
                    f"writing {self.path} failed after {self.lines_written} lines ({unwritten} not written): {e.strerror}",
                )
                raise self.error from e
            self.lines_written += data.count(b"\n")

    def fileno(self) -> int:
        """The events file's descriptor (fault injection points it elsewhere: tests/faults)."""
        return self._fd

    def _flush_loop(self) -> None:
        interval = self._flush_interval_ns / 1e9
        while not self._stop.is_set():
            woken = self._wake.wait(interval / 2)
            self._wake.clear()
            if woken or time.monotonic_ns() - self._last_flush_ns >= self._flush_interval_ns:
                try:
                    self.flush()
                except EventLogError:
                    return  # kept in self.error: the tenant's next emit raises it

    def close(self, fsync: bool = True) -> None:
        """Flush, fsync (so the log survives a host crash too) and close. Idempotent. The file
        is closed even when a write fails; the failure is raised (``EventLogError``)."""
        if self._closed:
            return
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.flush()
        finally:
            with self._lock:
                try:
                    if fsync and self.error is None:
                        os.fsync(self._fd)
                finally:
                    os.close(self._fd)
                    self._closed = True

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

