"""The base of engines that stream requests through asyncio: an event loop on a thread, one lock.

An engine whose work happens elsewhere (vLLM's engine core, a model server) only waits for
results, so it serves every request as one asyncio task on a loop in a background thread of the
tenant, and reports what comes back through one lock:

- the receiving side stamps ``time.monotonic_ns()`` and appends the event under the lock
  (``_record``); ``poll`` takes ``now_ns`` and drains under the same lock. So every event
  ``poll`` returns has ``t_ns <= now_ns`` and every later one ``t_ns > now_ns``: the ordering
  ``Progress`` promises (``backends.base``);
- ``submit`` and ``cancel`` hand work to the loop with ``call_soon_threadsafe`` (no Future, no
  waiting in the tenant's thread); each request's task is kept by rid until it ends;
- ``close`` cancels the tasks, lets the subclass release its resources on the loop
  (``_aclose``), stops the loop and joins its thread.

A subclass writes ``_serve(request)`` (one request, from send to ``Completion``) and, where it
has them, the health hooks. ``VllmEngine`` (AsyncLLM in process) and ``OpenAIEngine`` (a
streaming HTTP client) are two; an SGLang or TensorRT-LLM adapter would be another subclass.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from multitenant.backends.base import Completion, Emission, EngineFailed, Event, Progress
from multitenant.workload import RequestSpec

T = TypeVar("T")
JOIN_TIMEOUT_S = 10.0


class StreamEngine:
    """An asyncio loop on a thread, per-request tasks and the locked event list (module docstring)."""

    thread_name = "engine-loop"
    close_timeout_s = 10.0  # how long the subclass's _aclose may take

    def __init__(self) -> None:
        self.vocab_size = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._cond = threading.Condition(threading.Lock())
        # Read under the lock each time: poll swaps the list, so a reference kept from before
        # the swap would collect into a list nobody drains.
        self._events: list[Event] = []
        self._failure: str | None = None  # why the engine can serve no more (poll raises it)
        self._closed = False

    # -- the loop

    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=self.thread_name, daemon=True)
        self._thread.start()

    def _run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (load and close only)."""
        assert self._loop is not None, "the loop is not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout_s)

    # -- what the receiving side reports

    def _record(
        self, rid: int, tokens: int = 0, status: str | None = None, error: str | None = None,
        fields: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """Stamp now and append, under the lock: an ``Emission`` of ``tokens`` (when > 0), then a
        ``Completion`` with ``status`` (when given) at the same instant."""
        with self._cond:
            t = time.monotonic_ns()
            if tokens > 0:
                self._events.append(Emission(t, [rid], [tokens]))
            if status is not None:
                self._events.append(Completion(t, rid, status, error, fields))
            self._cond.notify()

    def _fail(self, reason: str) -> None:
        """Mark the engine failed (the first reason wins) and wake ``poll``, which raises."""
        with self._cond:
            if self._failure is None:
                self._failure = reason
            self._cond.notify()

    # -- the tenant protocol

    def submit(self, request: RequestSpec) -> None:
        """Hand the request to the loop (returns at once; what it gets comes back through ``poll``)."""
        if self._loop is None or self._closed:
            raise RuntimeError(f"submit before load() or after close() of {type(self).__name__}")
        self._loop.call_soon_threadsafe(self._start_request, request)

    def _start_request(self, request: RequestSpec) -> None:
        assert self._loop is not None
        rid = request.rid
        task = self._loop.create_task(self._serve(request))
        self._tasks[rid] = task
        task.add_done_callback(lambda done: self._forget(rid, done))

    def _forget(self, rid: int, task: asyncio.Task[None]) -> None:
        if self._tasks.get(rid) is task:
            del self._tasks[rid]

    async def _serve(self, request: RequestSpec) -> None:
        """Serve one request: ``_record`` its tokens and its completion (subclass)."""
        raise NotImplementedError

    def cancel(self, rids: list[int]) -> None:
        """Cancel the requests' tasks (the subclass's ``_serve`` stops the request where it runs)."""
        if self._loop is not None and not self._closed:
            self._loop.call_soon_threadsafe(self._cancel_tasks, list(rids))

    def _cancel_tasks(self, rids: list[int]) -> None:
        for rid in rids:
            task = self._tasks.get(rid)
            if task is not None:
                task.cancel()

    def poll(self, timeout_s: float) -> Progress:
        """Events since the last poll, all with t_ns <= now_ns; waits up to ``timeout_s`` when
        there are none. Raises EngineFailed once the engine can serve no more."""
        self._before_poll()
        with self._cond:
            if not self._events and self._failure is None and timeout_s > 0:
                self._cond.wait(timeout_s)
            now = time.monotonic_ns()
            events, self._events = self._events, []
            failure = self._failure
        if failure is None:
            failure = self._after_poll(now)
        if failure is not None:
            raise self._engine_failed(failure)
        return Progress(now, events)

    def _before_poll(self) -> None:
        """Health check before waiting; may raise EngineFailed itself (subclass)."""

    def _after_poll(self, now_ns: int) -> str | None:
        """Health check after draining: why the engine can serve no more, or None (subclass)."""
        return None

    def _engine_failed(self, reason: str) -> EngineFailed:
        """The EngineFailed ``poll`` raises for ``reason`` (a subclass adds what it knows)."""
        return EngineFailed(reason)

    # -- closing

    def close(self) -> None:
        """Cancel what is in flight, release the subclass's resources on the loop, stop the
        loop and join its thread; then ``_after_close``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            try:
                self._run(self._shutdown(), self.close_timeout_s)
            except Exception as e:  # closing is cleanup: report and go on
                print(f"{type(self).__name__}: closing failed: {type(e).__name__}: {e}", file=sys.stderr)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(JOIN_TIMEOUT_S)
            if not thread.is_alive():
                loop.close()
        self._after_close()

    async def _shutdown(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._aclose()

    async def _aclose(self) -> None:
        """Release what lives on the loop (a session, an engine), after the tasks ended (subclass)."""

    def _after_close(self) -> None:
        """Release what lives outside the loop (a launched server), after it stopped (subclass)."""
