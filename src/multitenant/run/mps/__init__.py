"""CUDA MPS for a run: control-daemon lifecycle, per-tenant environment, client verification.

Split by job: ``env`` (state root, pipe dirs, device mapping, a tenant's environment),
``control`` (the control binary, commands, PID queries, client verification), ``daemon``
(start / use / stop a daemon, its records, the manifest block), ``logs`` (faults MPS reports),
``cli`` (``mt-mps status|stop``).

What the orchestrator calls, re-exported here, in this order (mode ``mps``)::

    d = start_daemon(default_pipe_dir(idx, run_id), run_dir / "mps_log", idx, timeout_s)
    try:
        env = child_env(os.environ, tenant_env(share, idx, d.pipe_dir, d.log_dir))  # per tenant
        ... spawn tenants with env; each uses device "cuda:0" (see ``env``) ...
        clients = attached_pids(d, {name: pid})   # after every tenant sent `ready`
        # a tenant without clients: raise unattached_message(names, d)
        # when a tenant fails: pinned_limit_cause(name, share, stderr_tail) names an exhausted
        # pinned-memory limit; read_server_log_errors(d.log_dir) shows a propagated GPU fault
    finally:
        stop = stop_daemon(d, timeout_s)          # never raises; idempotent
        manifest.mps = manifest_block(d, stop)    # schema.MpsRecord

Mode ``mps_external`` uses ``external_daemon(pipe_dir, log_dir)`` instead of ``start_daemon``
(``stop_daemon`` then leaves the daemon alone); ``timeslice`` uses
``tenant_env(share, idx, None, None)``, which pins the tenant *away* from any MPS daemon.
Every failure is an ``MpsError`` whose message names the fix.
"""

from multitenant.run.mps.control import attached_pids, unattached_message
from multitenant.run.mps.daemon import MpsDaemon, external_daemon, manifest_block, start_daemon, stop_daemon
from multitenant.run.mps.env import MpsError, child_env, default_pipe_dir, physical_device, tenant_env
from multitenant.run.mps.logs import pinned_limit_cause, read_server_log_errors

__all__ = [
    "MpsDaemon",
    "MpsError",
    "attached_pids",
    "child_env",
    "default_pipe_dir",
    "external_daemon",
    "manifest_block",
    "physical_device",
    "pinned_limit_cause",
    "read_server_log_errors",
    "start_daemon",
    "stop_daemon",
    "tenant_env",
    "unattached_message",
]
