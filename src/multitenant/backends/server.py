"""Lifecycle of a model server an ``openai`` tenant launches: start, health, stop, its logs.

The command line it runs (placeholders, environment assignments, the port) is ``launch.py``'s.

The server runs in the tenant's process group (no new session), so the orchestrator stopping
the tenant's group stops the server and its workers too, even if the tenant dies first; it
inherits the tenant's environment, which carries the MPS variables, so it is the MPS client
of the tenant's share. Its output goes straight to ``<tenant_dir>/server.stdout.log`` and
``server.stderr.log`` (file descriptors the server owns, nothing the tenant must pump). The
port is picked free just before the launch; a server that loses it to another process is
relaunched on another, and a health answer only counts from a process of the server's tree.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

from multitenant.backends.base import EngineFailed
from multitenant.backends.launch import HOST, REDACTED, display_command, free_port, launch_argv, split_launch

HEALTH_POLL_S = 0.25
HEALTH_REQUEST_TIMEOUT_S = 2.0  # one health GET; a server that holds it longer is asked again
PORT_TRIES = 3  # launches when the server reports its port taken (another process won the race)
SNAPSHOT_INTERVAL_NS = 1_000_000_000  # check_alive lists the server's descendants this often
STOP_TIMEOUT_S = 30.0  # SIGTERM -> SIGKILL; vLLM needs a few seconds to stop its engine core
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_ERROR_LINE = re.compile(r"\w(?:Error|Exception)\b|\bERROR\b|\bCRITICAL\b|\bFATAL\b|\berror:|Segmentation fault")
_WARNING_LINE = re.compile(r"\bWARN(?:ING)?\b|Warning\b")  # a warning that quotes an error is not the cause
_PORT_TAKEN = re.compile(r"address already in use|errno 98\b|eaddrinuse", re.IGNORECASE)


class ServerError(RuntimeError):
    """A launched server did not come up (exited, never healthy); one line naming it and the cause."""


# ---------------------------------------------------------------------------------------------
# Logs and secrets


def _tail_lines(path: Path, start: int = 0) -> list[str]:
    """The non-empty lines of a log's last 64 KiB after byte ``start``, ANSI colours and
    progress-bar carriage returns removed, whitespace collapsed."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(start, size - 65536))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [" ".join(line.split()) for line in re.split(r"[\r\n]+", _ANSI.sub("", tail)) if line.strip()]


def last_line(path: Path, start: int = 0) -> str:
    """The last non-empty line of a log file after byte ``start`` (cleaned), or ''."""
    lines = _tail_lines(path, start)
    return lines[-1][:500] if lines else ""


def last_words(stderr_path: Path, stdout_path: Path, err_start: int = 0, out_start: int = 0) -> str:
    """The one line that best says why a server stopped, or ''.

    The last error-looking line (``...Error:``, ``ERROR``, ``error:``; not a warning) of its
    stderr, else of its stdout (vLLM logs there), else its last stderr line, else its last
    stdout line: a server's very last line is often shutdown noise (leak reports, warnings)."""
    err, out = _tail_lines(stderr_path, err_start), _tail_lines(stdout_path, out_start)
    for lines in (err, out):
        for line in reversed(lines):
            if _ERROR_LINE.search(line) and not _WARNING_LINE.search(line):
                return line[:500]
    for lines in (err, out):
        if lines:
            return lines[-1][:500]
    return ""


def redact_file(path: str | os.PathLike[str], secrets: Iterable[str]) -> bool:
    """Replace every occurrence of each (non-empty) secret in a file by ``<redacted>``.

    The file is rewritten (atomically, through a temporary file beside it) only when something
    changed. Returns whether it did; a missing file is not an error (False)."""
    p = Path(path)
    keys = sorted({s.encode() for s in secrets if s}, key=len, reverse=True)  # longest first: no partial leftovers
    if not keys:
        return False
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return False
    new = data
    for k in keys:
        new = new.replace(k, REDACTED.encode())
    if new == data:
        return False
    tmp = p.with_name(p.name + ".redacting")
    tmp.write_bytes(new)
    os.chmod(tmp, p.stat().st_mode & 0o777)
    os.replace(tmp, p)
    return True


# ---------------------------------------------------------------------------------------------
# The process


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def http_get(url: str, headers: dict[str, str], timeout_s: float) -> tuple[int, bytes]:
    """``(status, body)`` of a GET; an HTTP error status is returned, not raised (a connection
    failure raises OSError)."""
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def _failure_text(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or e
    return " ".join(str(reason).split()) or type(e).__name__


def wait_healthy(
    base_url: str,
    health_path: str | None,
    headers: dict[str, str],
    timeout_s: float,
    check: Callable[[], None] | None = None,
) -> str:
    """Poll a server until a health GET answers 200 and return the path that did.

    ``health_path`` if given, else ``/health``, falling back to ``/v1/models`` once ``/health``
    answers 404 (servers without it). ``check`` runs before each try and raises when the server
    is gone. Raises TimeoutError with the last answer seen when ``timeout_s`` has passed, and
    PermissionError on 401/403 (a wrong API key does not get better by waiting)."""
    deadline = time.monotonic() + timeout_s
    paths = [health_path] if health_path else ["/health", "/v1/models"]
    i = 0
    last = "no answer yet"
    while True:
        if check is not None:
            check()
        path = paths[i]
        try:
            left = deadline - time.monotonic()
            status, body = http_get(base_url + path, headers, timeout_s=min(HEALTH_REQUEST_TIMEOUT_S, max(0.5, left)))
        except (OSError, http.client.HTTPException) as e:  # refused while it starts; URLError is an OSError
            last = f"GET {path}: {_failure_text(e)}"
        else:
            if status == 200:
                return path
            if status == 404 and i + 1 < len(paths):
                i += 1
                continue
            text = " ".join(body.decode("utf-8", errors="replace").split())[:200]
            if status in (401, 403):
                raise PermissionError(f"GET {path} answered HTTP {status} ({text}); check the API key (openai.api_key_env)")
            last = f"GET {path} answered HTTP {status}" + (f" ({text})" if text else "")
        if time.monotonic() >= deadline:
            raise TimeoutError(last)
        time.sleep(HEALTH_POLL_S)


class _ExitedEarly(Exception):
    """The server process ended while we waited for it to be healthy (internal)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _running(p: psutil.Process) -> bool:
    # A zombie has exited: its parent (or init, after reparenting) only has to reap it.
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class LaunchedServer:
    """One server process started from a launch template, in the tenant's process group.

    ``start`` launches it on a free port and waits until it is healthy; ``check_alive`` raises
    EngineFailed once it has died; ``stop`` ends it and every process it started. The command
    shown in messages and ``command`` has the API key replaced by ``<redacted>``.
    """

    def __init__(
        self,
        template: str,
        model: str,
        log_dir: Path,
        preferred_port: int | None = None,
        api_key: str | None = None,
        health_path: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.template = template
        self.model = model
        self.log_dir = Path(log_dir)
        self.stdout_path = self.log_dir / "server.stdout.log"
        self.stderr_path = self.log_dir / "server.stderr.log"
        self.preferred_port = preferred_port
        self.api_key = api_key
        self.health_path = health_path
        self.env = env
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.command = display_command(*split_launch(template), [api_key or ""])
        self.health_path_used: str | None = None
        self._err_start = 0  # where this attempt's output starts in server.stderr.log
        self._out_start = 0  # ... and in server.stdout.log
        self._stopped = False
        # Every descendant seen so far: a worker whose parent dies mid-run is reparented away
        # from the server's tree, and stop must still find it.
        self._known: set[psutil.Process] = set()
        self._snapshot_ns = 0

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def last_words(self) -> str:
        """The line of this attempt's logs that best says why the server stopped (``last_words``)."""
        words = last_words(self.stderr_path, self.stdout_path, self._err_start, self._out_start)
        return words or f"it wrote nothing to {self.log_dir}/server.*.log"

    def start(self, timeout_s: float) -> None:
        """Launch the server and wait until it is healthy, at most ``timeout_s`` in all.

        A server that exits because its port was taken meanwhile is relaunched on another
        port (``PORT_TRIES`` launches at most). Raises ServerError (the process stopped) when it
        exits or is not healthy in time; any other exception (a stop signal) stops it too."""
        deadline = time.monotonic() + timeout_s
        port = free_port(self.preferred_port)
        for attempt in range(1, PORT_TRIES + 1):
            self._spawn(port)
            try:
                self.health_path_used = wait_healthy(
                    self.base_url, self.health_path, self.headers, deadline - time.monotonic(), self._check_starting
                )
                if self._owns_port(port):
                    self._known.update(self._descendants())
                    return
                # Another process took the port between free_port and our bind, and answered
                # our health check while our server was still starting: never use it.
                self.stop()
                if attempt == PORT_TRIES:
                    raise ServerError(
                        f"server `{self.command}`: port {port} is served by another process, {PORT_TRIES} times; "
                        "set openai.port to a port nothing else uses"
                    )
                print(f"openai server: port {port} is served by another process; retrying", file=sys.stderr)
                port = free_port(None)
                continue
            except _ExitedEarly as e:
                self.stop()  # what it started may still run
                if _PORT_TAKEN.search(self._attempt_stderr()) and attempt < PORT_TRIES:
                    print(f"openai server: port {port} was taken before the server bound it; retrying", file=sys.stderr)
                    port = free_port(None)
                    continue
                raise ServerError(
                    f"server `{self.command}` {_exit_text(e.code)} before it was healthy: {self.last_words()}"
                ) from None
            except TimeoutError as e:
                line = self.last_words()
                self.stop()
                raise ServerError(
                    f"server `{self.command}` was not healthy within {timeout_s:g} s ({e}); last log line: {line}; "
                    "raise openai.health_timeout_s if it is still loading, else see its log"
                ) from None
            except PermissionError as e:
                self.stop()
                raise ServerError(f"server `{self.command}` refuses the harness: {e}") from None
            except BaseException:
                self.stop()  # e.g. TenantStopped from a SIGTERM while the model loads
                raise

    def _spawn(self, port: int) -> None:
        self.port = port
        env_add, argv = launch_argv(self.template, port, self.model, self.api_key)
        self.command = display_command(env_add, argv, [self.api_key or ""])
        env = {**(self.env if self.env is not None else os.environ), **env_add}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._err_start = self.stderr_path.stat().st_size if self.stderr_path.exists() else 0
        self._out_start = self.stdout_path.stat().st_size if self.stdout_path.exists() else 0
        print(f"openai server: starting `{self.command}`; logs in {self.log_dir}/server.*.log", file=sys.stderr, flush=True)
        # Same process group and session as the tenant: stopping the tenant's group stops the
        # server too. close_fds (the default) keeps the tenant's control pipes out of it, so
        # the orchestrator still sees their end-of-file when the tenant dies.
        try:
            with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        except OSError as e:
            raise ServerError(f"server `{self.command}` cannot be started: {e}; fix openai.launch") from None
        self._stopped = False

    def _owns_port(self, port: int) -> bool:
        """Whether the server or one of its descendants listens on ``port`` (True when the
        system does not let us look)."""
        assert self.proc is not None
        try:
            server = psutil.Process(self.proc.pid)
            procs = [server, *server.children(recursive=True)]
        except psutil.Error:
            return False
        for p in procs:
            try:
                conns = p.net_connections(kind="inet")
            except psutil.AccessDenied:
                return True
            except psutil.Error:
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns):
                return True
        return False

    def _check_starting(self) -> None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            raise _ExitedEarly(code)
        self._snapshot()

    def _snapshot(self) -> None:
        """Remember the server's descendants, at most every SNAPSHOT_INTERVAL_NS."""
        now = time.monotonic_ns()
        if now - self._snapshot_ns >= SNAPSHOT_INTERVAL_NS:
            self._snapshot_ns = now
            self._known.update(self._descendants())

    def _attempt_stderr(self) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(self._err_start)
                return f.read()[-65536:].decode("utf-8", errors="replace")
        except OSError:
            return ""

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def check_alive(self) -> None:
        """Raise EngineFailed (one line: the command, pid, exit, last stderr line) if the server died."""
        if self.proc is None or self._stopped:
            return
        code = self.proc.poll()
        if code is None:
            self._snapshot()
            return
        raise EngineFailed(f"server `{self.command}` (pid {self.proc.pid}) {_exit_text(code)} mid-run: {self.last_words()}")

    def _descendants(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the server, wait up to ``timeout_s``, then SIGKILL it and every descendant.

        Descendants are those seen while it ran (``check_alive`` looks every second) and those
        found before the SIGTERM and before the SIGKILL: once a parent exits, its children are
        reparented and no longer found through the server. Idempotent; never raises (a
        problem is reported on stderr)."""
        proc = self.proc
        if proc is None or self._stopped:
            return
        self._stopped = True
        procs: set[psutil.Process] = set(self._known)
        try:
            procs.update(self._descendants())
            deadline = time.monotonic() + timeout_s
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    procs.update(self._descendants())
                    print(
                        f"openai server: `{self.command}` (pid {proc.pid}) ignored SIGTERM for {timeout_s:g} s; killing it",
                        file=sys.stderr,
                        flush=True,
                    )
                    proc.kill()
                    proc.wait(5.0)
            # A server that stopped cleanly has stopped its workers; orphans get a short grace.
            grace_end = min(deadline, time.monotonic() + 2.0)
            while any(_running(p) for p in procs) and time.monotonic() < grace_end:
                time.sleep(0.05)
            _kill(procs, wait_s=5.0)
        except BaseException as e:
            # Interrupted (a second stop signal) or failed: nothing may outlive the tenant.
            with contextlib.suppress(Exception):
                proc.kill()
            with contextlib.suppress(Exception):
                _kill(procs, wait_s=0.0)
            print(f"openai server: stopping pid {proc.pid}: {type(e).__name__}: {e}; killed it", file=sys.stderr, flush=True)
            if not isinstance(e, Exception):
                raise


def _kill(procs: Iterable[psutil.Process], wait_s: float) -> None:
    """SIGKILL those of ``procs`` still running; wait up to ``wait_s`` for them to go."""
    left = [p for p in procs if _running(p)]
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    end = time.monotonic() + wait_s
    while any(_running(p) for p in left) and time.monotonic() < end:
        time.sleep(0.05)
