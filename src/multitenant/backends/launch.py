"""The command line of a server an ``openai`` tenant launches: placeholders, environment, port.

``OpenAIOptions.launch`` is a command line split like a shell would (``shlex``) with
placeholders ``{port}``, ``{host}`` (127.0.0.1), ``{model}``, ``{python}`` (this Python) and
``{api_key}``; a template without ``{port}`` gets ``--host 127.0.0.1 --port <port>`` appended
(vLLM, SGLang and llama.cpp all take these). Leading ``NAME=value`` words are environment
assignments, as in a shell (``VLLM_CPU_KVCACHE_SPACE=1 vllm serve ...``). No shell runs: pipes,
globs and ``$VAR`` are not expanded.

Nothing here imports aiohttp, torch or vLLM, and nothing starts a process:
``check_launch_command`` runs during config validation, before anything starts.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import sys
from collections.abc import Iterable
from pathlib import Path

HOST = "127.0.0.1"
PLACEHOLDERS = ("port", "host", "model", "python", "api_key")
REDACTED = "<redacted>"
_ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_PLACEHOLDER = re.compile(r"(?<!\$)\{([A-Za-z_][A-Za-z0-9_]*)\}")




def free_port(preferred: int | None = None) -> int:
    """A TCP port on 127.0.0.1 that is free now: ``preferred`` if it is, else one the OS picks
    (a busy preferred port is reported on stderr). The server binds it later, so another
    process may still take it first: ``LaunchedServer`` retries on that."""
    if preferred:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, preferred))
                return preferred
            except OSError:
                pass
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port = int(s.getsockname()[1])
    if preferred:
        print(f"openai server: port {preferred} is busy, using {port} instead", file=sys.stderr, flush=True)
    return port


def split_launch(template: str) -> tuple[dict[str, str], list[str]]:
    """``(env assignments, words)`` of a launch template, placeholders not yet filled.

    Raises ValueError (shlex's message) on unbalanced quotes."""
    words = shlex.split(template)
    env: dict[str, str] = {}
    while words and _ENV_ASSIGNMENT.match(words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


def _fill(word: str, values: dict[str, str]) -> str:
    # str.replace, not str.format: a word may hold JSON ({"max_loras": 2}) that format would break.
    for name, value in values.items():
        word = word.replace("{" + name + "}", value)
    return word


def launch_argv(template: str, port: int, model: str, api_key: str | None = None) -> tuple[dict[str, str], list[str]]:
    """``(env assignments, argv)`` of a launch template with its placeholders filled.

    Without ``{port}`` in the template, ``--host 127.0.0.1 --port <port>`` is appended. Raises
    ValueError when the template uses ``{api_key}`` and there is no key."""
    env, words = split_launch(template)
    if "{api_key}" in template and api_key is None:
        raise ValueError(
            "launch command uses {api_key} but no API key is set; set openai.api_key_env to the name of an "
            "environment variable holding it"
        )
    values = {"port": str(port), "host": HOST, "model": model, "python": sys.executable, "api_key": api_key or ""}
    argv = [_fill(w, values) for w in words]
    if argv:
        argv[0] = os.path.expanduser(argv[0])  # ~/bin/server, as a shell would
    env = {k: _fill(v, values) for k, v in env.items()}
    if "{port}" not in template:
        argv += ["--host", HOST, "--port", str(port)]
    return env, argv


def display_command(env: dict[str, str], argv: list[str], secrets: Iterable[str] = ()) -> str:
    """The command as one shell-quoted line, each secret replaced by ``<redacted>``."""
    words = [f"{k}={v}" for k, v in env.items()] + argv
    for s in secrets:
        if s:
            words = [w.replace(s, REDACTED) for w in words]
    return shlex.join(words)


def check_launch_command(template: str) -> str | None:
    """One line saying why ``template`` cannot be started, or None if it can.

    Checks what can be known before anything runs: the command is not empty, its quotes
    balance, its placeholders are known ones, and its executable exists (on PATH, or as an
    executable file; ``{python}`` is this Python). Cheap: no process is started."""
    if not template or not template.strip():
        return "launch command is empty; give the server's command line, e.g. '{python} -m vllm.entrypoints.openai.api_server --model {model}'"
    try:
        _, words = split_launch(template)
    except ValueError as e:
        return f"launch command `{template}` cannot be split into words ({e}); balance its quotes"
    unknown = sorted({m for m in _PLACEHOLDER.findall(template) if m not in PLACEHOLDERS})
    if unknown:
        known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
        return f"launch command `{template}` uses unknown placeholder {{{unknown[0]}}}; use only {known}"
    if not words:
        return f"launch command `{template}` sets variables but names no program; add the server's command"
    exe = words[0]
    if exe == "{python}":
        return None
    if _PLACEHOLDER.search(exe):
        return None  # e.g. {model}/serve.sh: only known once the model folder exists
    if os.sep in exe:
        path = Path(exe).expanduser()
        if not path.is_file() or not os.access(path, os.X_OK):
            return f"launch command `{template}`: {exe} is not an executable file; fix the path or chmod +x it"
        return None
    if shutil.which(exe) is None:
        return (
            f"launch command `{template}`: {exe} is not on PATH; install it in this environment, give its full "
            "path, or start it with {python} -m ..."
        )
    return None
