"""Lifecycle of a launched server (backends/server.py) against the SSE test server.

The test server (tests/servers/sse_server.py) starts in about half a second; each test that
launches one stops it, and checks that nothing it started is left running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from multitenant.backends import launch as launch_mod
from multitenant.backends import server as srv
from multitenant.backends.base import EngineFailed
from multitenant.backends.launch import check_launch_command, display_command, free_port, launch_argv
from multitenant.backends.server import LaunchedServer, ServerError, last_line, last_words, redact_file

SSE = Path(__file__).resolve().parents[2] / "servers" / "sse_server.py"
TEMPLATE = f"{{python}} {SSE} --port {{port}}"


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting to be reaped counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if gone(pid):
            return True
        time.sleep(0.05)
    return gone(pid)


@pytest.fixture
def listening_socket():
    """A port some other process holds (bound and listening on 127.0.0.1)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s
    s.close()


@pytest.fixture
def servers():
    """LaunchedServer instances a test creates; all stopped at the end whatever happened."""
    made: list[LaunchedServer] = []
    yield made
    for s in made:
        s.stop(timeout_s=2)


def launched(servers: list[LaunchedServer], tmp_path: Path, template: str = TEMPLATE, **kw) -> LaunchedServer:
    s = LaunchedServer(template, model="unused", log_dir=tmp_path, **kw)
    servers.append(s)
    return s


# -- ports and command lines ----------------------------------------------------------------------


def test_free_port_keeps_a_free_preferred_port():
    port = free_port(None)
    assert free_port(port) == port


def test_free_port_replaces_a_busy_preferred_port_and_says_so(listening_socket, capsys):
    busy = listening_socket.getsockname()[1]
    port = free_port(busy)
    assert port != busy, f"busy port {busy} was handed out"
    assert f"port {busy} is busy, using {port}" in capsys.readouterr().err


def test_launch_argv_fills_every_placeholder_and_leaves_json_alone():
    env, argv = launch_argv(
        "{python} -m srv --host {host} --port {port} --model {model} --key {api_key} --cfg '{\"a\": {\"b\": 1}}'",
        port=8123,
        model="/m/x",
        api_key="sk-1",
    )
    assert env == {}
    assert argv == [
        sys.executable, "-m", "srv", "--host", "127.0.0.1", "--port", "8123", "--model", "/m/x", "--key", "sk-1",
        "--cfg", '{"a": {"b": 1}}',
    ]


def test_launch_argv_appends_host_and_port_when_the_template_has_no_port():
    _, argv = launch_argv("vllm serve {model}", port=9000, model="/m")
    assert argv == ["vllm", "serve", "/m", "--host", "127.0.0.1", "--port", "9000"]


def test_launch_argv_takes_leading_assignments_as_environment():
    env, argv = launch_argv("VLLM_CPU_KVCACHE_SPACE=1 X={port} vllm serve", port=9000, model="/m")
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "1", "X": "9000"}
    assert argv[:2] == ["vllm", "serve"]


def test_launch_argv_with_api_key_placeholder_but_no_key_names_the_fix():
    with pytest.raises(ValueError, match="api_key_env"):
        launch_argv("srv --api-key {api_key}", port=1, model="m", api_key=None)


def test_display_command_redacts_the_api_key():
    line = display_command({}, ["srv", "--api-key", "sk-secret", "--x=sk-secret"], ["sk-secret"])
    assert "sk-secret" not in line and line.count("<redacted>") == 2, line


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("", "launch command is empty"),
        ("   ", "launch command is empty"),
        ("{python} -m x --name 'unbalanced", "balance its quotes"),
        ("no-such-server-binary-xyz --port {port}", "no-such-server-binary-xyz is not on PATH"),
        ("/no/such/dir/server --port {port}", "/no/such/dir/server is not an executable file"),
        ("{python} -m vllm --port {prot}", "unknown placeholder {prot}"),
        ("A=1 B=2", "names no program"),
    ],
)
def test_check_launch_command_reports_what_cannot_start(template, expected):
    problem = check_launch_command(template)
    assert problem is not None and expected in problem, f"{template!r}: {problem!r}"
    assert "\n" not in problem


def test_check_launch_command_rejects_a_file_that_is_not_executable(tmp_path):
    script = tmp_path / "serve.sh"
    script.write_text("#!/bin/sh\n")
    problem = check_launch_command(f"{script} --port {{port}}")
    assert problem is not None and "chmod +x" in problem, problem


@pytest.mark.parametrize(
    "template",
    [
        "{python} -m http.server {port}",
        "{python} -u -m json.tool",
        "VLLM_CPU_KVCACHE_SPACE=1 sh -c 'exec sleep 1'",
        f"{sys.executable} -m http.server",
        "{model}/serve.sh --port {port}",  # only known once the model folder exists
        "sh -c 'echo ${HOME}'",  # a shell's ${VAR} is not a placeholder
    ],
)
def test_check_launch_command_accepts_startable_commands(template):
    assert check_launch_command(template) is None


def test_check_launch_command_refuses_a_module_that_is_not_installed(monkeypatch):
    problem = check_launch_command("{python} -m no_such_module_xyz.server --port {port}")
    assert problem is not None and "install no_such_module_xyz in this environment" in problem, problem
    template = "{python} -m vllm.entrypoints.openai.api_server --model {model}"
    monkeypatch.setattr(launch_mod, "module_installed", lambda name: name != "vllm")
    problem = check_launch_command(template)
    assert problem is not None and "bash scripts/setup.sh vllm" in problem and "\n" not in problem, problem
    monkeypatch.setattr(launch_mod, "module_installed", lambda name: True)
    assert check_launch_command(template) is None


def test_backend_declarations_import_nothing_heavy():
    """The registry (and check_launch_command) is read by config validation, before anything starts."""
    code = (
        "import sys, multitenant.backends, multitenant.backends.server; "
        "heavy = [m for m in ('aiohttp', 'torch', 'transformers', 'vllm') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, f"imported {res.stdout.strip()} {res.stderr[-300:]}"


# -- logs and secrets -----------------------------------------------------------------------------


def test_last_line_drops_colours_and_progress_bar_returns(tmp_path):
    log = tmp_path / "err.log"
    log.write_bytes(b"first\n\x1b[31mERROR\x1b[0m  boom: it broke\n\r 10%|#  \r 50%|#####  \r\n\n")
    assert last_line(log) == "50%|#####"
    log.write_bytes(b"first\n\x1b[31mERROR\x1b[0m  boom: it broke\n\n")
    assert last_line(log) == "ERROR boom: it broke"
    assert last_line(tmp_path / "missing.log") == ""


def test_last_words_prefer_the_last_error_line_over_shutdown_noise(tmp_path):
    err, out = tmp_path / "server.stderr.log", tmp_path / "server.stdout.log"
    err.write_text("Triton is installed\nnanobind: leaked 4 instances!\n - leaked type \"x\"\n")
    out.write_text(
        "INFO 12-02 [api_server.py] Starting\n"
        "(APIServer pid=1) ERROR 12-02 [serving.py:500] vllm.v1.engine.exceptions.EngineDeadError: EngineCore died.\n"
        "INFO:     Shutting down\n"
        "(APIServer pid=1) WARNING 12-02 [base.py:380] ValueError: Tokenizer not available\n"
    )
    assert last_words(err, out).endswith("EngineDeadError: EngineCore died."), "an error line on stdout (vLLM logs there)"
    err.write_text("Traceback (most recent call last):\nValueError: bad --dtype\nwarnings.warn(\n")
    assert last_words(err, out) == "ValueError: bad --dtype", "stderr's error line comes first"
    err.write_text("just a line\n")
    out.write_text("INFO fine\n")
    assert last_words(err, out) == "just a line", "without error lines: the last stderr line"
    assert last_words(tmp_path / "none.err", tmp_path / "none.out") == ""


def test_redact_file_replaces_every_secret_and_rewrites_only_on_change(tmp_path):
    log = tmp_path / "server.stdout.log"
    log.write_text("args: --api-key sk-abc123 and sk-abc123 again; other sk-zz\n")
    assert redact_file(log, ["sk-abc123", "sk-zz", ""]) is True
    assert log.read_text() == "args: --api-key <redacted> and <redacted> again; other <redacted>\n"
    mtime = log.stat().st_mtime_ns
    assert redact_file(log, ["sk-abc123"]) is False
    assert log.stat().st_mtime_ns == mtime, "a file without secrets is not rewritten"
    assert redact_file(tmp_path / "missing.log", ["sk-abc123"]) is False
    assert redact_file(log, [""]) is False, "an empty secret redacts nothing"


# -- launching ------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_launch_substitutes_port_and_waits_until_healthy(tmp_path, servers):
    s = launched(servers, tmp_path)
    s.start(timeout_s=20)
    status, _ = srv.http_get(s.base_url + "/health", {}, 2)
    assert status == 200
    assert f"'--port', '{s.port}'" in (tmp_path / "server.stdout.log").read_text()
    assert s.health_path_used == "/health"


@pytest.mark.timeout(30)
def test_launch_appends_host_and_port_without_port_placeholder(tmp_path, servers):
    s = launched(servers, tmp_path, template=f"{{python}} {SSE}")
    s.start(timeout_s=20)
    assert f"'--host', '127.0.0.1', '--port', '{s.port}'" in (tmp_path / "server.stdout.log").read_text()
    assert s.command.endswith(f"--host 127.0.0.1 --port {s.port}"), s.command


@pytest.mark.timeout(30)
def test_launched_server_is_in_the_tenants_process_group(tmp_path, servers):
    s = launched(servers, tmp_path)
    s.start(timeout_s=20)
    assert s.pid is not None
    assert os.getpgid(s.pid) == os.getpgrp(), "the orchestrator stops the tenant's group: the server must be in it"
    assert os.getsid(s.pid) == os.getsid(0)


@pytest.mark.timeout(30)
def test_health_falls_back_to_models_when_health_is_missing(tmp_path, servers):
    s = launched(servers, tmp_path, template=TEMPLATE + " --no-health")
    s.start(timeout_s=20)
    assert s.health_path_used == "/v1/models"


@pytest.mark.timeout(30)
def test_busy_preferred_port_is_replaced_by_a_free_one(tmp_path, servers, listening_socket):
    busy = listening_socket.getsockname()[1]
    s = launched(servers, tmp_path, preferred_port=busy)
    s.start(timeout_s=20)
    assert s.port != busy, f"server put on busy port {busy}"
    assert srv.http_get(s.base_url + "/health", {}, 2)[0] == 200


@pytest.mark.timeout(40)
def test_port_taken_before_the_server_binds_is_retried_on_another_port(tmp_path, servers, listening_socket, monkeypatch):
    busy = listening_socket.getsockname()[1]
    real = srv.free_port
    handed = iter([busy])
    monkeypatch.setattr(srv, "free_port", lambda preferred=None: next(handed, None) or real(None))
    s = launched(servers, tmp_path)
    s.start(timeout_s=30)
    assert s.port != busy
    assert "address already in use" in (tmp_path / "server.stderr.log").read_text().lower()
    assert srv.http_get(s.base_url + "/health", {}, 2)[0] == 200


@pytest.mark.timeout(40)
def test_a_port_answered_by_another_process_is_never_used(tmp_path, servers, monkeypatch):
    """Another process took our port first and answers the health check while ours still starts."""
    import http.server
    import threading

    impostor = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    impostor.RequestHandlerClass.do_GET = lambda self: (self.send_response(200), self.end_headers())
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    taken = impostor.server_address[1]
    real = srv.free_port
    handed = iter([taken])
    monkeypatch.setattr(srv, "free_port", lambda preferred=None: next(handed, None) or real(None))
    try:
        s = launched(servers, tmp_path, template=TEMPLATE + " --startup-delay-s 0.5")
        s.start(timeout_s=30)
    finally:
        impostor.shutdown()
    assert s.port != taken, f"the harness took the impostor on port {taken} for its server"
    assert s._owns_port(s.port)


@pytest.mark.timeout(30)
def test_never_healthy_is_one_line_with_the_last_log_line_and_the_process_gone(tmp_path, servers):
    s = launched(servers, tmp_path, template=TEMPLATE + " --fail-health")
    t = time.monotonic()
    with pytest.raises(ServerError) as exc:
        s.start(timeout_s=2)
    msg = str(exc.value)
    assert time.monotonic() - t < 10
    assert "\n" not in msg
    assert msg.startswith(f"server `{sys.executable} {SSE} --port {s.port} --fail-health` was not healthy within 2 s"), msg
    assert "GET /health answered HTTP 503" in msg, msg
    assert f"last log line: sse_server: serving on http://127.0.0.1:{s.port}" in msg, msg
    assert s.pid is not None and wait_gone(s.pid), f"server pid {s.pid} still running after the failure"


@pytest.mark.timeout(30)
def test_exit_at_start_names_the_command_the_exit_code_and_its_last_words(tmp_path, servers):
    s = launched(servers, tmp_path, template=TEMPLATE + " --exit-at-start")
    with pytest.raises(ServerError) as exc:
        s.start(timeout_s=20)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg == (
        f"server `{sys.executable} {SSE} --port {s.port} --exit-at-start` exited with code 1 before it was healthy: "
        "sse_server: exiting at start (--exit-at-start)"
    ), msg


def test_a_missing_executable_cannot_be_started(tmp_path, servers):
    s = launched(servers, tmp_path, template="no-such-server-binary-xyz --port {port}")
    with pytest.raises(ServerError, match="no-such-server-binary-xyz --port .* cannot be started"):
        s.start(timeout_s=5)


@pytest.mark.timeout(30)
def test_check_alive_raises_engine_failed_once_the_server_died(tmp_path, servers):
    s = launched(servers, tmp_path)
    s.start(timeout_s=20)
    s.check_alive()  # alive: no exception
    assert s.pid is not None
    os.kill(s.pid, signal.SIGKILL)
    end = time.monotonic() + 5
    with pytest.raises(EngineFailed) as exc:  # noqa: PT012 (the death takes a moment to be seen)
        while time.monotonic() < end:
            s.check_alive()
            time.sleep(0.02)
    msg = str(exc.value)
    assert msg.startswith(f"server `{s.command}` (pid {s.pid}) was killed by SIGKILL mid-run: "), msg
    assert "sse_server: serving on" in msg, msg


# -- stopping -------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_stop_kills_the_servers_children_even_those_ignoring_sigterm(tmp_path, servers):
    pidfile = tmp_path / "child.pid"
    s = launched(servers, tmp_path, template=TEMPLATE + f" --spawn-child {pidfile}")
    s.start(timeout_s=20)
    child = int(pidfile.read_text())
    assert not gone(child)
    t = time.monotonic()
    s.stop(timeout_s=5)
    assert s.pid is not None and gone(s.pid), "server still running after stop"
    assert wait_gone(child, 2), f"child {child} of the server survived stop"
    assert time.monotonic() - t < 10


@pytest.mark.timeout(30)
def test_stop_kills_a_worker_orphaned_mid_run(tmp_path, servers):
    """A worker whose parent died mid-run is no longer under the server; stop still finds it."""
    pidfile = tmp_path / "tree.pid"
    s = launched(servers, tmp_path, template=TEMPLATE + f" --spawn-tree {pidfile}")
    s.start(timeout_s=20)
    middle, grand = map(int, pidfile.read_text().split())
    os.kill(middle, signal.SIGKILL)
    assert wait_gone(middle), f"middle process {middle} survived SIGKILL"
    s.check_alive()
    s.stop(timeout_s=2)
    assert wait_gone(grand, 3), f"orphaned grandchild {grand} survived stop"


@pytest.mark.timeout(30)
def test_stop_escalates_to_sigkill_when_the_server_ignores_sigterm(tmp_path, servers):
    s = launched(servers, tmp_path, template=TEMPLATE + " --ignore-sigterm")
    s.start(timeout_s=20)
    t = time.monotonic()
    s.stop(timeout_s=1)
    took = time.monotonic() - t
    assert s.returncode == -signal.SIGKILL, f"returncode {s.returncode}"
    assert 0.9 < took < 8, f"stop took {took:.1f} s with a 1 s SIGTERM timeout"


@pytest.mark.timeout(30)
def test_stop_is_idempotent_and_quiet(tmp_path, servers):
    never = launched(servers, tmp_path / "never")
    never.stop()  # never started: nothing to do, no exception
    s = launched(servers, tmp_path)
    s.start(timeout_s=20)
    s.stop(timeout_s=5)
    s.stop(timeout_s=5)
    s.check_alive()  # a server we stopped is not a failure
    assert s.returncode is not None


# -- the API key of a vLLM server -----------------------------------------------------------------

_FAKE_VLLM_SERVER = """
import os, runpy, sys
# Stands in for vLLM's server: the SSE test server, which takes the key vLLM reads from VLLM_API_KEY.
key = os.environ.get("VLLM_API_KEY")
sys.argv = [{sse!r}, *sys.argv[1:], *(["--api-key", key] if key else [])]
runpy.run_path({sse!r}, run_name="__main__")
"""


def test_launch_argv_passes_a_vllm_servers_key_in_its_environment():
    for template in ("vllm serve /m --api-key {api_key}", "{python} -m vllm.entrypoints.openai.api_server --api-key={api_key}"):
        env, argv = launch_argv(template, port=1, model="m", api_key="sk-1")
        assert env == {"VLLM_API_KEY": "sk-1"} and not any("sk-1" in w or w.startswith("--api-key") for w in argv), argv
    env, argv = launch_argv("srv --key {api_key}", port=1, model="m", api_key="sk-1")  # not vLLM: the fallback
    assert env == {} and "sk-1" in argv


def test_a_launched_vllm_server_has_the_key_in_its_environment_not_its_argv(tmp_path, servers, monkeypatch):
    """``ps`` shows a process's argv to every user; /proc/<pid>/environ only to its owner."""
    pkg = tmp_path / "fake" / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (pkg.parents[1], pkg.parent, pkg):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(_FAKE_VLLM_SERVER.format(sse=str(SSE)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")]))
    key = "sk-test-0123456789"
    s = LaunchedServer("{python} -m vllm.entrypoints.openai.api_server --api-key {api_key}", "m", tmp_path, api_key=key)
    servers.append(s)
    s.start(30)
    assert key not in Path(f"/proc/{s.pid}/cmdline").read_bytes().decode()
    assert f"VLLM_API_KEY={key}" in Path(f"/proc/{s.pid}/environ").read_bytes().decode()
    assert srv.http_get(s.base_url + "/v1/models", {"Authorization": f"Bearer {key}"}, 5)[0] == 200
    assert srv.http_get(s.base_url + "/v1/models", {}, 5)[0] == 401
    assert key not in s.command
