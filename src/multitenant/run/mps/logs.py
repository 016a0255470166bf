"""What MPS says went wrong: fault lines in its control and server logs
(``read_server_log_errors``), and the cause of a tenant's out-of-memory under its pinned limit,
which MPS does not log (``pinned_limit_cause``)."""

from __future__ import annotations

import re
from pathlib import Path

from multitenant.config.schema import ShareConfig

# Lines of control.log / server.log that report a client or server failure, as driver 580 words
# them (docs/validation/mps-probe-h100.md): "Client {PID: 947, Context: 1} encountered a fatal
# GPU error.", "Server is handling a fatal GPU error.", "... to be torn down", "... have a sticky
# error set", "Server 705 exited with status 1". Routine lines do not match: "New client ...
# connected", "Server failed to recevie command with status 806, assuming client ... exit" (a
# client that exited), "User did not send valid credentials" (a bare connect), "Server 705
# exited with status 0", "Client termination succeeded." (our own terminate_client).
_FAULT_PATTERNS = re.compile(
    r"fatal|fault|sticky error|torn down|illegal|exceed|out of memory|xid"
    r"|exited with status [1-9]|killed by signal|failed to start|server failed",
    re.IGNORECASE,
)
_BENIGN_PATTERNS = re.compile(r"assuming client .* exit|valid credentials", re.IGNORECASE)


def read_server_log_errors(log_dir: Path, limit: int = 20) -> list[str]:
    """Fault lines from ``control.log`` and every ``server.log`` under ``log_dir``, oldest first.

    Each line keeps its ``[timestamp Server|Control pid]`` prefix. The first one says that (and
    when) MPS hit a fatal error and tore its clients down; the client PID it names need not be
    the one that caused it (on the H100 MPS named the healthy client), so the cause is the
    tenant that failed first, and this line is the proof the fault was propagated. Missing
    files are not an error (the server may never have started).
    """
    log_dir = Path(log_dir)
    files = [log_dir / "control.log", log_dir / "server.log", *sorted(log_dir.glob("*/server.log"))]
    found: list[str] = []
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if _FAULT_PATTERNS.search(line) and not _BENIGN_PATTERNS.search(line):
                found.append(line.strip())
    found.sort(key=_log_sort_key)
    return found[:limit]


_OOM = re.compile(r"out of memory|CUDA_ERROR_OUT_OF_MEMORY|cudaErrorMemoryAllocation", re.IGNORECASE)


def pinned_limit_cause(tenant: str, share: ShareConfig, stderr_tail: str) -> str | None:
    """The one-line cause for a tenant that died of CUDA out-of-memory under a pinned limit.

    Under ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` an allocation past the limit fails as an ordinary
    CUDA out-of-memory error (PyTorch: "CUDA out of memory ... of which 395 MiB is free"); MPS
    logs nothing. So the limit is named here, from the tenant's share and its stderr.
    """
    limit = share.pinned_mem_limit
    if not limit or not _OOM.search(stderr_tail):
        return None
    return (
        f"tenant {tenant} ran out of GPU memory at its MPS pinned memory limit "
        f"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT={limit}; raise tenants.{tenant}.share.pinned_mem_limit "
        "or reduce the tenant's batch / KV cache"
    )


def _log_sort_key(line: str) -> str:
    # "[2026-11-22 10:00:00.123 Server 123] ..." sorts by its timestamp; other lines keep order.
    m = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)", line)
    return m.group(1) if m else ""


