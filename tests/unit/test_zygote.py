"""The tenant zygote (run/zygote.py): a forked child gets its own session, environment,
directory and fds, its exit code or signal comes back as ``Popen`` would give it, and the
zygote never outlives the process that started it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from multitenant.run.zygote import ForkedProcess, Zygote, unsafe_differences

CHILD = "tests.unit.zygote_child"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    z = Zygote(env, cwd=str(ROOT))
    z.preload(["torch", CHILD.rsplit(".", 1)[0]])  # torch: the thread count must follow the child's env
    yield z
    z.close()
    assert z.proc.returncode is not None


def fork(z: Zygote, tmp: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[ForkedProcess, Any, int]:
    """Fork the test child; returns it, the read end of its report pipe, and the write end of its input pipe."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    with open(os.devnull, "rb") as devnull, open(tmp / "stdout.log", "wb") as so, open(tmp / "stderr.log", "wb") as se:
        proc = z.fork(
            ["--in", "{ctl_in}", "--out", "{ctl_out}", *args], env if env is not None else z.env, str(cwd or tmp),
            (devnull.fileno(), so.fileno(), se.fileno(), in_r, out_w), module=CHILD,
        )  # fmt: skip
    os.close(in_r)
    os.close(out_w)
    return proc, os.fdopen(out_r), in_w


def report(out: Any) -> dict[str, Any]:
    line = out.readline()
    assert line, "the child sent no report"
    return dict(json.loads(line))


def test_child_gets_its_session_env_cwd_and_fds(zygote: Zygote, tmp_path: Path) -> None:
    env = {**zygote.env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "MT_TEST_VAR": "x"}
    env.pop("PYTORCH_NVML_BASED_CUDA_CHECK")
    cwd = tmp_path / "work"
    cwd.mkdir()
    proc, out, in_w = fork(zygote, tmp_path, "--torch", env=env, cwd=cwd)
    r = report(out)
    assert proc.wait(30) == 0
    os.close(in_w)
    assert r["pid"] == proc.pid and r["ppid"] == zygote.proc.pid
    assert r["sid"] == r["pgid"] == proc.pid  # its own session and process group: killpg stops it all
    assert r["cwd"] == str(cwd)
    assert r["env"] == env  # replaced as a whole: the zygote's own variables are gone
    assert r["name"] == "__main__" and r["argv"][0].endswith("zygote_child.py")
    assert r["stdin"] == "/dev/null" and r["stdout"] == str(tmp_path / "stdout.log")
    assert (tmp_path / "stdout.log").read_text() == "hello from the child\n"
    assert r["fds"] == 6  # 0-2, two pipes, listdir's own
    assert r["threads"] == 1  # OMP_NUM_THREADS of the child, not the zygote's default
    assert r["cuda_initialized"] is False
    fresh = fresh_report(env, cwd, tmp_path)
    same = ("cwd", "env", "name", "stdin", "fds", "threads", "cuda_initialized", "sigint", "sigterm")
    assert {k: r[k] for k in same} == {k: fresh[k] for k in same}
    assert len(r["argv"]) == len(fresh["argv"]) and Path(r["argv"][0]).resolve() == Path(fresh["argv"][0]).resolve()
    assert fresh["sid"] == fresh["pid"]


def fresh_report(env: dict[str, str], cwd: Path, tmp: Path) -> dict[str, Any]:
    """The same child started as tenants.spawn starts a fresh tenant."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    with open(tmp / "fresh.log", "wb") as so:
        proc = subprocess.Popen(
            [sys.executable, "-m", CHILD, "--in", str(in_r), "--out", str(out_w), "--torch"], stdin=subprocess.DEVNULL,
            stdout=so, stderr=so, env=env, pass_fds=(in_r, out_w), start_new_session=True, cwd=cwd,
        )  # fmt: skip
    os.close(in_r)
    os.close(out_w)
    with os.fdopen(out_r) as out:
        r = report(out)
    assert proc.wait(60) == 0
    os.close(in_w)
    return r


def test_exit_codes_and_signals_come_back_as_popen_gives_them(zygote: Zygote, tmp_path: Path) -> None:
    proc, out, in_w = fork(zygote, tmp_path, "--exit", "3")
    report(out)
    assert proc.wait(30) == 3 and proc.poll() == 3 and proc.returncode == 3
    proc, out, in_w = fork(zygote, tmp_path, "--signal", str(int(signal.SIGKILL)))
    report(out)
    assert proc.wait(30) == -signal.SIGKILL
    proc, out, in_w = fork(zygote, tmp_path, "--wait")
    report(out)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGTERM)  # as the orchestrator stops a tenant
    assert proc.wait(30) == -signal.SIGTERM


def test_an_unhandled_exception_exits_1_with_its_traceback_on_stderr(zygote: Zygote, tmp_path: Path) -> None:
    proc, out, in_w = fork(zygote, tmp_path, "--no-such-flag")
    assert proc.wait(30) == 2  # argparse's exit, as in a fresh process
    assert "unrecognized arguments" in (tmp_path / "stderr.log").read_text()


def test_only_variables_read_at_first_use_may_differ() -> None:
    base = {"PATH": "/bin", "HF_HOME": "/a", "TORCHINDUCTOR_CACHE_DIR": "/c/inductor"}
    ok = {**base, "CUDA_VISIBLE_DEVICES": "0", "CUDA_MPS_PIPE_DIRECTORY": "/p", "OMP_NUM_THREADS": "2"}
    assert unsafe_differences(ok, base) == []
    assert unsafe_differences({**base, "HF_HOME": "/b"}, base) == ["HF_HOME"]
    assert unsafe_differences({**base, "TORCHINDUCTOR_CACHE_DIR": "/d/inductor"}, base) == ["TORCHINDUCTOR_CACHE_DIR"]
    assert unsafe_differences({k: v for k, v in base.items() if k != "PATH"}, base) == ["PATH"]


def test_the_zygote_exits_when_its_client_closes_it(tmp_path: Path) -> None:
    z = Zygote(cwd=str(tmp_path))
    pid = z.proc.pid
    z.close(timeout_s=10)
    assert z.proc.returncode == 0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("how", ["SIGKILL", "exit"])
def test_the_zygote_dies_with_its_parent(tmp_path: Path, how: str) -> None:
    """mt-run killed (SIGKILL: no atexit, no close) or gone without closing it: no zygote left."""
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from multitenant.run.zygote import Zygote
        z = Zygote()
        z.preload(["json"])
        print(z.proc.pid, flush=True)
        if {how!r} == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(0)
    """)
    parent = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    zpid = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if psutil.Process(zpid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    else:
        psutil.Process(zpid).kill()
        pytest.fail(f"the zygote {zpid} outlived its parent ({how})")
