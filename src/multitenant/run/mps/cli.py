"""``mt-mps status [--json]`` | ``mt-mps stop PIPE_DIR... | --all``: inspect or stop the MPS
control daemons the harness started (after a run was killed, say), from their records."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multitenant.run.mps.control import CONTROL_BIN_NAME, all_client_pids, daemon_answers
from multitenant.run.mps.daemon import (
    MpsDaemon,
    harness_daemons,
    is_mps_process,
    record_create_time,
    recorded_daemon,
    stop_daemon,
)
from multitenant.run.mps.env import MpsError


@dataclass
class DaemonStatus:
    """One row of ``mt-mps status``: is the recorded daemon alive, does it answer, its clients."""

    pipe_dir: str
    log_dir: str
    control_pid: int | None
    alive: bool
    answers: bool
    servers: dict[int, list[int]] = field(default_factory=dict)  # server pid -> client pids

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` row (server PIDs as string keys)."""
        return {
            "pipe_dir": self.pipe_dir,
            "log_dir": self.log_dir,
            "control_pid": self.control_pid,
            "alive": self.alive,
            "answers": self.answers,
            "servers": {str(k): v for k, v in self.servers.items()},
        }


def daemon_status(d: MpsDaemon, timeout_s: float = 3.0) -> DaemonStatus:
    """One row of ``mt-mps status``."""
    create_time = record_create_time(d.pipe_dir)
    alive = bool(d.control_pid) and is_mps_process(int(d.control_pid or 0), create_time)
    answers = daemon_answers(d.pipe_dir, timeout_s)
    row = DaemonStatus(str(d.pipe_dir), str(d.log_dir), d.control_pid, alive, answers)
    if answers:
        with contextlib.suppress(MpsError):
            row.servers = all_client_pids(d, timeout_s)
    return row


def main(argv: list[str] | None = None) -> int:
    """``mt-mps status [--json]`` | ``mt-mps stop PIPE_DIR... | --all``.

    Exit codes: 0 ok (status: no harness daemon is running; stop: everything stopped),
    1 something is left (status: a daemon runs; stop: a daemon survived), 2 usage.
    """
    parser = argparse.ArgumentParser(
        prog="mt-mps", description="Inspect or stop the CUDA MPS control daemons that multitenant started."
    )
    sub = parser.add_subparsers(dest="cmd")
    p_status = sub.add_parser("status", help="list daemons the harness started (exit 1 if any runs)")
    p_status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_stop = sub.add_parser("stop", help="stop daemons the harness started")
    p_stop.add_argument("pipe_dirs", nargs="*", type=Path, help="pipe directories (see mt-mps status)")
    p_stop.add_argument("--all", action="store_true", help="stop every daemon the harness started")
    p_stop.add_argument("--timeout", type=float, default=20.0, help="seconds per daemon (default 20)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code not in (0, None) else 0
    if args.cmd is None:
        parser.print_usage(sys.stderr)
        return 2
    try:
        if args.cmd == "status":
            return _status(args.json)
        return _stop(args.pipe_dirs, args.all, args.timeout)
    except MpsError as e:
        print(f"mt-mps: {e}", file=sys.stderr)
        return 2


def _status(as_json: bool) -> int:
    rows = [daemon_status(d) for d in harness_daemons()]
    if as_json:
        print(json.dumps([r.to_json() for r in rows], indent=1))
    elif not rows:
        print("no MPS daemon started by multitenant is recorded")
    else:
        for r in rows:
            state = "running" if r.alive else "dead (stale record)"
            state += ", answers" if r.answers else ", does not answer"
            print(f"{r.pipe_dir}  pid {r.control_pid}  {state}")
            for srv, clients in r.servers.items():
                print(f"    server {srv}: clients {' '.join(map(str, clients)) or '-'}")
            print(f"    logs: {r.log_dir}")
    return 1 if any(r.alive or r.answers for r in rows) else 0


def _stop(pipe_dirs: list[Path], stop_all: bool, timeout_s: float) -> int:
    if stop_all == bool(pipe_dirs):
        print("mt-mps stop: give PIPE_DIR(s) or --all (see mt-mps status)", file=sys.stderr)
        return 2
    known = {str(d.pipe_dir): d for d in harness_daemons()}
    targets: list[MpsDaemon] = []
    if stop_all:
        targets = list(known.values())
    else:
        for p in pipe_dirs:
            key = str(p.absolute())
            recorded = known.get(key) or recorded_daemon(p.absolute())
            if recorded is None:
                print(
                    f"mt-mps stop: no multitenant record for {p}; the harness stops only daemons it "
                    f"started (another daemon: echo quit | CUDA_MPS_PIPE_DIRECTORY={p} {CONTROL_BIN_NAME})",
                    file=sys.stderr,
                )
                return 2
            targets.append(recorded)
    if not targets:
        print("nothing to stop")
        return 0
    rc = 0
    for d in targets:
        res = stop_daemon(d, timeout_s)
        print(f"{d.pipe_dir}: {'stopped' if res.clean else 'NOT stopped'} ({'; '.join(res.actions)})")
        if not res.clean:
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
