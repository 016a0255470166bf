"""What a child forked by the tenant zygote runs in tests/unit/test_zygote.py: it reports what
it got (ids, directory, environment, fds, thread count) as one JSON line on ``--out FD`` and
ends as told (``--exit N`` or ``--signal N``), or waits for a line on ``--in FD``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--in", dest="fd_in", type=int)
ap.add_argument("--out", type=int, required=True)
ap.add_argument("--exit", type=int, default=0)
ap.add_argument("--signal", type=int)
ap.add_argument("--wait", action="store_true")
ap.add_argument("--torch", action="store_true", help="import torch (preloaded in the zygote)")
args = ap.parse_args()

if args.torch:
    import torch  # noqa: F401
torch = sys.modules.get("torch")
report = {
    "pid": os.getpid(),
    "ppid": os.getppid(),
    "sid": os.getsid(0),
    "pgid": os.getpgid(0),
    "cwd": os.getcwd(),
    "env": dict(os.environ),
    "name": __name__,
    "argv": sys.argv,
    "stdin": os.readlink("/proc/self/fd/0"),
    "stdout": os.readlink("/proc/self/fd/1"),
    "fds": len(os.listdir("/proc/self/fd")),
    "threads": torch.get_num_threads() if torch is not None else None,
    "cuda_initialized": torch.cuda.is_initialized() if torch is not None else None,
    "sigint": str(signal.getsignal(signal.SIGINT)),
    "sigterm": str(signal.getsignal(signal.SIGTERM)),
}
print("hello from the child")  # to its stdout file
with os.fdopen(args.out, "w") as out:
    out.write(json.dumps(report) + "\n")
if args.wait and args.fd_in is not None:
    os.read(args.fd_in, 1)
if args.signal:
    os.kill(os.getpid(), args.signal)
sys.exit(args.exit)
