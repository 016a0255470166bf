"""Fault injection for the fault-injection suite (``tests/faults/``): off unless ``MT_FAULT`` is set.

    MT_FAULT=<tenant>:<fault>@<when>        e.g.  b:crash@load   b:crash@window+1   b:enospc@window+1

Read once by each tenant process; only the tenant named ``<tenant>`` acts on it, so one
variable in the environment of ``mt-run`` hits one tenant of a pair. Faults:

- ``crash``: the process ends at once with ``CRASH_EXIT_CODE`` after one line on stderr: no
  cleanup, no ``run_end``, nothing more to the orchestrator, as a segfault or an abort leave it.
- ``enospc``: the events file's descriptor is pointed at ``/dev/full``, so every later write of
  the log fails with ENOSPC from the kernel, as when the disk fills up.

When: ``load`` (as the engine starts loading, before ``ready``) or ``window+S`` (S seconds after
the tenant's own window start, from a timer thread: the serving loop is not touched).
Nothing here runs in a tenant without ``MT_FAULT``.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from multitenant.events import EventWriter

FAULT_ENV = "MT_FAULT"
CRASH_EXIT_CODE = 86  # distinct from 1 (the tenant's own error exit) and from signal deaths
FAULTS = ("crash", "enospc")
_SPEC_RE = re.compile(r"^(?P<tenant>[^:]+):(?P<fault>[a-z]+)@(?P<when>load|window\+(?P<after>\d+(?:\.\d+)?))$")


@dataclass(frozen=True)
class Fault:
    tenant: str
    fault: str  # crash | enospc
    at_load: bool  # False: window_after_s after the window start
    window_after_s: float = 0.0

    def load(self, writer: EventWriter) -> None:
        """Called as the engine starts loading."""
        if self.at_load:
            self._fire(writer)

    def window(self, t0_ns: int, writer: EventWriter) -> None:
        """Called once the window is known: fires ``window_after_s`` after ``t0_ns``."""
        if self.at_load:
            return

        def fire_later() -> None:
            time.sleep(max(0.0, (t0_ns - time.monotonic_ns()) / 1e9 + self.window_after_s))
            self._fire(writer)

        threading.Thread(target=fire_later, name="mt-fault", daemon=True).start()

    def _fire(self, writer: EventWriter) -> None:
        print(f"{FAULT_ENV}: injecting {self.fault} into tenant {self.tenant}", file=sys.stderr, flush=True)
        if self.fault == "crash":
            os._exit(CRASH_EXIT_CODE)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, writer.fileno())
        os.close(full)


def from_env(tenant: str, environ: Mapping[str, str] | None = None) -> Fault | None:
    """The fault ``MT_FAULT`` asks of ``tenant``, or None (unset, or meant for another tenant).
    A malformed value raises ValueError: a fault test must not pass because nothing was injected."""
    value = (os.environ if environ is None else environ).get(FAULT_ENV)
    if not value:
        return None
    m = _SPEC_RE.match(value.strip())
    if m is None or m["fault"] not in FAULTS:
        raise ValueError(
            f"{FAULT_ENV}={value!r} is not <tenant>:<{'|'.join(FAULTS)}>@<load|window+SECONDS>; e.g. b:crash@window+1"
        )
    if m["tenant"] != tenant:
        return None
    after = m["after"]
    return Fault(m["tenant"], m["fault"], at_load=after is None, window_after_s=float(after or 0.0))
