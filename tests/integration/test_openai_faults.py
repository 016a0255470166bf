"""Failure paths of ``openai`` tenants, end to end through ``mt-run`` on the CPU.

The server each tenant launches is the SSE test server (tests/servers/sse_server.py), told to
misbehave; no vLLM is needed. Every test runs the real ``mt-run`` in a subprocess and checks
the exit code, the manifest's status and reason, that every events.jsonl left is readable,
and that nothing the run started is still running.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.event_checks import check_request_invariants, read_events
from tests.integration.test_pair_tiny import mt_run

pytestmark = pytest.mark.slow

SSE = Path(__file__).resolve().parents[1] / "servers" / "sse_server.py"
SOLO = "solo/openai_tiny"
SOLO_T = "openai_tiny_cpu"  # the tenant's name in solo/openai_tiny
PAIR = "multitenant/pair_openai_tiny"


# -- helpers ----------------------------------------------------------------------------------


def sse_launch(tmp_path: Path, name: str, *flags: str) -> str:
    """A launch template for the SSE server. ``--log-requests`` under ``tmp_path`` records every
    request it got and puts ``tmp_path`` in its command line, so leftovers can be found by it."""
    return " ".join(
        [f"{{python}} {SSE} --port {{port}}", f"--log-requests {tmp_path / f'{name}.requests.jsonl'}", *flags]
    )


def tenant_overrides(
    name: str, launch: str, duration_s: float = 2, warmup: int = 2, health_timeout_s: float = 20
) -> list[str]:
    return [
        f"tenants.{name}.openai.launch='{launch}'",
        f"tenants.{name}.openai.health_timeout_s={health_timeout_s}",
        f"tenants.{name}.workload.duration_s={duration_s}",
        f"tenants.{name}.workload.warmup_requests={warmup}",
    ]


def run(
    config: str, run_dir: Path, overrides: list[str], env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return mt_run(
        ["--config-name", config, f"hydra.run.dir={run_dir}", "progress=false", *overrides], env, cwd, timeout
    )


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def leftovers(manifest: dict[str, Any] | None, marker: str) -> list[str]:
    """What of the run is still running (zombies excepted): a tenant, one of its ``child_pids``,
    its server, anything in a tenant's process group, or any process whose command line names
    ``marker`` (the test's tmp_path: tenants' spec paths, the SSE servers' request logs)."""
    left: list[str] = []
    for name, t in ((manifest or {}).get("tenants") or {}).items():
        pids = {"pid": [t["pid"]] if t["pid"] else [], "child_pids": t.get("child_pids") or []}
        server_pid = (t.get("engine") or {}).get("server_pid")
        pids["server_pid"] = [server_pid] if server_pid else []
        for what, ps in pids.items():
            left += [f"tenant {name} {what} {p}" for p in ps if _alive(p)]
        if t["pid"]:
            try:  # the tenant's process group: its server and workers live there
                os.killpg(t["pid"], 0)
                left.append(f"tenant {name} process group {t['pid']}")
            except ProcessLookupError:
                pass
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if marker in cmd and p.info["status"] != psutil.STATUS_ZOMBIE and p.pid != os.getpid():
            left.append(f"pid {p.pid}: {cmd[:200]}")
    return left


def manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "manifest.json").read_text())


def readable_events(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every tenant's events.jsonl that exists, read; each starts with run_start."""
    out = {}
    for path in sorted((run_dir / "tenants").glob("*/events.jsonl")):
        events = read_events(path)
        assert events and events[0]["ev"] == "run_start", path
        out[path.parent.name] = events
    return out


def server_requests(tmp_path: Path, name: str) -> list[dict[str, Any]]:
    path = tmp_path / f"{name}.requests.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- tests ------------------------------------------------------------------------------------


def test_server_never_healthy_fails_the_run_with_its_last_log_line(
    tmp_path: Path, mt_env: dict[str, str]
) -> None:
    run_dir = tmp_path / "run"
    launch = sse_launch(tmp_path, "s", "--fail-health")
    res = run(SOLO, run_dir, tenant_overrides(SOLO_T, launch, health_timeout_s=3), mt_env, tmp_path)
    assert res.returncode == 1, res.stderr[-3000:]
    m = manifest(run_dir)
    assert m["status"] == "failed"
    reason = m["reason"]
    assert reason.startswith(f"tenant {SOLO_T} failed"), reason
    assert "ServerError: server `" in reason and "sse_server.py" in reason, (
        "the reason names the server's command"
    )
    assert "was not healthy within 3 s" in reason and "GET /health answered HTTP 503" in reason, reason
    # The server's last stderr line is quoted.
    assert "last log line: sse_server: serving on http://127.0.0.1:" in reason, reason
    assert len(reason.splitlines()) == 1
    assert m["window"]["t0_ns"] is None, "no window opened"
    assert server_requests(tmp_path, "s") == [], "no request reached a server that never was healthy"
    events = readable_events(run_dir)[SOLO_T]
    assert not any(e["ev"] in ("ready", "window", "sent") for e in events)
    # The orchestrator's stop, which follows the tenant's error at once, must not cut the
    # tenant's own cleanup short: it exits 1 and its log ends with run_end status error.
    assert m["tenants"][SOLO_T]["exit_code"] == 1
    assert events[-1]["ev"] == "run_end" and events[-1]["status"] == "error"
    assert leftovers(m, str(tmp_path)) == []


def test_server_dying_mid_window_fails_the_run_and_stops_the_other_tenant(
    tmp_path: Path, mt_env: dict[str, str]
) -> None:
    run_dir = tmp_path / "run"
    # a's server exits (code 3) 1 s after its first request; with no warm-up that is 1 s into
    # the 8 s window. b is healthy and must be stopped, not left to run out its window.
    overrides = [
        *tenant_overrides(
            "a", sse_launch(tmp_path, "a", "--die-after-s 1", "--token-delay-s 0.01"), duration_s=8, warmup=0
        ),
        *tenant_overrides("b", sse_launch(tmp_path, "b"), duration_s=8, warmup=2),
    ]
    res = run(PAIR, run_dir, overrides, mt_env, tmp_path)
    assert res.returncode == 1, res.stderr[-3000:]
    m = manifest(run_dir)
    assert m["status"] == "failed"
    reason = m["reason"]
    server_pid = m["tenants"]["a"]["engine"]["server_pid"]
    assert reason.startswith("tenant a failed"), reason
    assert f"(pid {server_pid})" in reason and "sse_server.py" in reason, reason
    assert "exited with code 3 mid-run" in reason, reason
    assert "sse_server: dying on purpose (--die-after-s)" in reason, "its last words are quoted"
    t0, t1 = m["window"]["t0_ns"], m["window"]["t1_ns"]
    assert t0 is not None and t1 == t0 + 8_000_000_000
    assert m["ended_ns"] < t1, "the run stopped at the server's death, not at the window's end"
    events = readable_events(run_dir)
    a = events["a"]
    per = check_request_invariants(a)
    toks = [e for e in a if e["ev"] == "tok"]
    assert toks and all(e["t"] >= t0 for e in toks), "a streamed tokens in the window before its server died"
    assert sum(r["done"]["status"] == "ok" for r in per.values()) >= 1
    failed = [r["done"] for r in per.values() if r["done"]["status"] == "error"]
    assert failed and all("server `" in d["error"] and "mid-run" in d["error"] for d in failed), failed
    b = events["b"]
    check_request_invariants(b)
    assert b[-1]["ev"] == "run_end" and b[-1]["status"] == "interrupted", "b was stopped by a's failure"
    assert leftovers(m, str(tmp_path)) == []


def test_request_rejected_by_the_server_is_an_error_and_the_run_goes_on(
    tmp_path: Path, mt_env: dict[str, str]
) -> None:
    run_dir = tmp_path / "run"
    # openai_tiny_cpu's prompts are 24..40 tokens and outputs 12..20 (input_len 32, output_len
    # 16, range_ratio 0.25): with --max-model-len 52 some requests fit and some do not.
    max_len = 52
    launch = sse_launch(tmp_path, "s", f"--max-model-len {max_len}")
    res = run(SOLO, run_dir, tenant_overrides(SOLO_T, launch, duration_s=2, warmup=4), mt_env, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    m = manifest(run_dir)
    assert m["status"] == "ok" and m["reason"] is None
    events = readable_events(run_dir)[SOLO_T]
    assert events[-1]["ev"] == "run_end" and events[-1]["status"] == "ok"
    per = check_request_invariants(events)
    t0, t1 = m["window"]["t0_ns"], m["window"]["t1_ns"]
    too_long = {rid for rid, r in per.items() if r["sched"]["n_in"] + r["sched"]["n_out_target"] > max_len}
    rejected = {rid for rid in too_long if per[rid]["done"]["status"] == "error"}
    for rid, r in per.items():
        d = r["done"]
        if d["status"] == "cancelled":  # only the window's end cancels
            assert d["t"] >= t1, d
        elif rid in too_long:
            assert d["status"] == "error" and d["n_out"] == 0 and r["tok"] == 0, d
            assert d["error"].startswith(
                f"HTTP 400: This model's maximum context length is {max_len} tokens"
            ), d
        else:
            assert d["status"] == "ok", d
    measured = sorted(
        (rid for rid, r in per.items() if r["sent"]["t"] >= t0), key=lambda rid: per[rid]["sent"]["t"]
    )
    first_rejection = min((per[rid]["done"]["t"] for rid in measured if rid in rejected), default=None)
    assert first_rejection is not None, "some measured requests were rejected"
    assert any(
        per[rid]["done"]["status"] == "ok" and per[rid]["sent"]["t"] > first_rejection for rid in measured
    ), "requests after a rejection were served"
    counts = events[-1]["counts"]
    assert counts["errors"] == sum(per[r]["done"]["status"] == "error" for r in measured) > 0
    assert counts["requests"] == sum(per[r]["done"]["status"] == "ok" for r in measured) > 0
    # The rejected requests did reach the server (it refused them; the client did not skip them).
    got = server_requests(tmp_path, "s")
    assert (
        len(rejected)
        <= sum(len(g["body"]["prompt"]) + g["body"]["max_tokens"] > max_len for g in got)
        <= len(too_long)
    )
    assert leftovers(m, str(tmp_path)) == []


def test_missing_launch_command_exits_2_before_anything_starts(
    tmp_path: Path, mt_env: dict[str, str]
) -> None:
    run_dir = tmp_path / "run"
    res = run(
        SOLO,
        run_dir,
        [f"tenants.{SOLO_T}.openai.launch='no-such-server-xyz --port {{port}}'"],
        mt_env,
        tmp_path,
        60,
    )
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"mt-run: error: tenants.{SOLO_T}.openai.launch:"), err
    assert "no-such-server-xyz --port {port}" in err and "not on PATH" in err, err
    assert not run_dir.exists(), "a config error leaves no run folder"


def test_busy_preferred_port_is_replaced_by_a_free_one(tmp_path: Path, mt_env: dict[str, str]) -> None:
    run_dir = tmp_path / "run"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy.setblocking(False)
        port = busy.getsockname()[1]
        overrides = [
            *tenant_overrides(SOLO_T, sse_launch(tmp_path, "s")),
            f"tenants.{SOLO_T}.openai.port={port}",
        ]
        res = run(SOLO, run_dir, overrides, mt_env, tmp_path)
        with pytest.raises(BlockingIOError):
            busy.accept()  # nobody talked to the port's owner
    assert res.returncode == 0, res.stderr[-3000:]
    m = manifest(run_dir)
    assert m["status"] == "ok" and m["reason"] is None
    engine = m["tenants"][SOLO_T]["engine"]
    used = int(engine["base_url"].rsplit(":", 1)[1])
    assert used != port
    assert f"--port {used}" in engine["server_command"]
    stderr = (run_dir / "tenants" / SOLO_T / "stderr.log").read_text()
    assert f"openai server: port {port} is busy, using {used} instead" in stderr
    per = check_request_invariants(readable_events(run_dir)[SOLO_T])
    assert sum(r["done"]["status"] == "ok" for r in per.values()) >= 4, "the server on the other port served"
    assert leftovers(m, str(tmp_path)) == []


def test_backend_vllm_without_vllm_exits_2_with_the_install_command(
    tmp_path: Path, mt_env: dict[str, str]
) -> None:
    # sys.modules["vllm"] = None: importlib.util.find_spec("vllm") (config.vllm_installed)
    # returns None and `import vllm` raises ImportError, as without the package.
    block = tmp_path / "no_vllm"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['vllm'] = None\n")
    env = dict(mt_env, PYTHONPATH=os.pathsep.join(p for p in (str(block), mt_env.get("PYTHONPATH")) if p))
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('vllm'))"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert probe.stdout.strip() == "None", "the simulation hides vllm"
    run_dir = tmp_path / "run"
    res = run("multitenant/pair_vllm_tiny", run_dir, [], env, tmp_path, 60)
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("mt-run: error: tenants.a.backend: backend vllm but vllm is not installed"), err
    assert "bash scripts/setup.sh vllm" in err
    assert not run_dir.exists()
