"""The command line of a server an ``openai`` tenant launches: placeholders, environment, port.

``OpenAIOptions.launch`` is a command line split like a shell would (``shlex``) with
placeholders ``{port}``, ``{host}`` (127.0.0.1), ``{model}``, ``{python}`` (this Python) and
``{api_key}``; a template without ``{port}`` gets ``--host 127.0.0.1 --port <port>`` appended
(vLLM, SGLang and llama.cpp all take these). Leading ``NAME=value`` words are environment
assignments, as in a shell (``VLLM_CPU_KVCACHE_SPACE=1 vllm serve ...``). No shell runs: pipes,
globs and ``$VAR`` are not expanded.

The API key: a process's argv is visible to every user of the machine (``ps``), its environment
only to its owner. A vLLM server (``vllm serve`` or ``-m vllm.entrypoints.openai.api_server``)
reads its key from ``VLLM_API_KEY``, so it gets the key there and a ``--api-key {api_key}`` of
its template is dropped from its argv. For other servers ``{api_key}`` is filled into the
command line as written: the fallback, visible in ``ps`` while the server runs.

Nothing here imports aiohttp, torch or vLLM, and nothing starts a process:
``check_launch_command`` runs during config validation, before anything starts.
"""

from __future__ import annotations

import importlib.util
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
VLLM_INSTALL_FIX = "install the vLLM stack with: bash scripts/setup.sh vllm"
# vllm-cpu, in-process or as a server, needs a KV cache size (GiB; it has no default) and must
# not pin its OpenMP threads to cores other tenants use. The user's own settings win.
VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
VLLM_API_KEY_ENV = "VLLM_API_KEY"
VLLM_SERVER_MODULES = ("vllm.entrypoints.openai.api_server", "vllm.entrypoints.cli.main")
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

    Without ``{port}`` in the template, ``--host 127.0.0.1 --port <port>`` is appended. A vLLM
    server gets ``api_key`` in ``VLLM_API_KEY``, not in its argv (module docstring). Raises
    ValueError when the template uses ``{api_key}`` and there is no key."""
    env, words = split_launch(template)
    if "{api_key}" in template and api_key is None:
        raise ValueError(
            "launch command uses {api_key} but no API key is set; set openai.api_key_env to the name of an "
            "environment variable holding it"
        )
    key_in_env = api_key is not None and is_vllm_server(words)
    if key_in_env:
        words = _without_key_option(words)
    values = {"port": str(port), "host": HOST, "model": model, "python": sys.executable, "api_key": api_key or ""}
    argv = [_fill(w, values) for w in words]
    if argv:
        argv[0] = os.path.expanduser(argv[0])  # ~/bin/server, as a shell would
    env = {k: _fill(v, values) for k, v in env.items()}
    if key_in_env:
        assert api_key is not None
        env.setdefault(VLLM_API_KEY_ENV, api_key)
    if "{port}" not in template:
        argv += ["--host", HOST, "--port", str(port)]
    return env, argv


def module_installed(package: str) -> bool:
    """Whether a top-level package can be imported here (found, not imported)."""
    return importlib.util.find_spec(package) is not None


def python_module(words: list[str]) -> str | None:
    """The module of ``<python> [options] -m <module> ...``, else None."""
    for i in range(1, len(words) - 1):
        if words[i] == "-m":
            return words[i + 1]
        if not words[i].startswith("-"):
            return None
    return None


def is_vllm_server(words: list[str]) -> bool:
    """Whether a launch template's words start vLLM's OpenAI server (which reads VLLM_API_KEY)."""
    if len(words) >= 2 and os.path.basename(words[0]) == "vllm" and words[1] == "serve":
        return True
    return python_module(words) in VLLM_SERVER_MODULES


def _without_key_option(words: list[str]) -> list[str]:
    """``words`` less ``--api-key {api_key}`` and ``--api-key={api_key}``."""
    out: list[str] = []
    skip = False
    for i, w in enumerate(words):
        if skip:
            skip = False
        elif w == "--api-key" and i + 1 < len(words) and "{api_key}" in words[i + 1]:
            skip = True
        elif not (w.startswith("--api-key=") and "{api_key}" in w):
            out.append(w)
    return out


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
    executable file; ``{python}`` is this Python, and the module of ``{python} -m <module>`` must
    be installed in it). Cheap: no process is started, no module imported."""
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
        module = python_module(words)
        if module is None or _PLACEHOLDER.search(module):
            return None
        package = module.split(".")[0]
        if module_installed(package):
            return None
        fix = VLLM_INSTALL_FIX if package == "vllm" else f"install {package} in this environment"
        return f"launch command `{template}`: module {package} is not installed for {sys.executable}; {fix}"
    if _PLACEHOLDER.search(exe):
        return None  # e.g. {model}/serve.sh: only known once the model folder exists
    if os.sep in exe:
        path = Path(exe).expanduser()
        if not path.is_file() or not os.access(path, os.X_OK):
            return f"launch command `{template}`: {exe} is not an executable file; fix the path or chmod +x it"
        return None
    if shutil.which(exe) is None and exe == "vllm":
        return f"launch command `{template}`: vllm is not on PATH; {VLLM_INSTALL_FIX}"
    if shutil.which(exe) is None:
        return (
            f"launch command `{template}`: {exe} is not on PATH; install it in this environment, give its full "
            "path, or start it with {python} -m ..."
        )
    return None
