"""The control messages between the orchestrator and a tenant process: one JSON line each over
the tenant's two pipes (``encode``, ``decode_message``, ``decode_command``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from multitenant.schema.core import from_dict


@dataclass
class Counts:
    """A tenant's counts over its measured phase (``progress``, ``finished``, ``run_end``)."""

    requests: int = 0
    tokens: int = 0
    errors: int = 0
    cancelled: int = 0


@dataclass
class ReadyMsg:
    """Tenant -> orchestrator: loaded and warmed up (then it waits for the window)."""

    kind: ClassVar[str] = "ready"
    load_s: float
    warmup_s: float
    pid: int
    child_pids: list[int] = field(default_factory=list)
    engine: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    device_name: str | None = None
    sms: int | None = None
    total_memory_bytes: int | None = None
    probe_error: str | None = None
    # From the orchestrator's spawn (or fork) to the start of loading: interpreter, imports,
    # engine construction. None when the tenant was started by hand.
    import_s: float | None = None


@dataclass
class WarmupMsg:
    """Tenant -> orchestrator: loaded in ``load_s``; compiling, capturing, serving warm-up requests."""

    kind: ClassVar[str] = "warmup"
    load_s: float


@dataclass
class ProgressMsg:
    """Tenant -> orchestrator, every 0.5 s of its measured phase: counts so far at ``t``."""

    kind: ClassVar[str] = "progress"
    t: int
    counts: Counts = field(default_factory=Counts)


@dataclass
class ErrorMsg:
    """Tenant -> orchestrator: the tenant failed; ``error`` is the cause on one line."""

    kind: ClassVar[str] = "error"
    error: str


@dataclass
class FinishedMsg:
    """Tenant -> orchestrator, last: how it ended and its counts over the measured phase."""

    kind: ClassVar[str] = "finished"
    status: str  # TenantStatus
    counts: Counts = field(default_factory=Counts)


@dataclass
class WindowCmd:
    """Orchestrator -> tenant: your measured phase is [t0, t1] (t1 None: stop on your count)."""

    kind: ClassVar[str] = "window"
    t0: int
    t1: int | None = None


@dataclass
class StopCmd:
    """Orchestrator -> tenant: stop now (cancel what is in flight, write run_end, exit)."""

    kind: ClassVar[str] = "stop"


TENANT_MESSAGES: dict[str, type] = {m.kind: m for m in (WarmupMsg, ReadyMsg, ProgressMsg, ErrorMsg, FinishedMsg)}
COMMANDS: dict[str, type] = {m.kind: m for m in (WindowCmd, StopCmd)}
MESSAGE_KEY = "msg"  # tenant -> orchestrator lines: {"msg": kind, ...fields}
COMMAND_KEY = "cmd"  # orchestrator -> tenant lines: {"cmd": kind, ...fields}

Message = WarmupMsg | ReadyMsg | ProgressMsg | ErrorMsg | FinishedMsg
Command = WindowCmd | StopCmd


def encode(message: Message | Command) -> str:
    """One JSON line (no newline) of a control message or command."""
    key = COMMAND_KEY if isinstance(message, (WindowCmd, StopCmd)) else MESSAGE_KEY
    return json.dumps({key: message.kind, **dataclasses.asdict(message)})


def decode_message(line: bytes | str) -> Message:
    """A tenant's message from one JSON line; ValueError for an unknown kind."""
    data = json.loads(line)
    cls = TENANT_MESSAGES.get(data.pop(MESSAGE_KEY, None))
    if cls is None:
        raise ValueError(f"unknown tenant message {line!r}")
    msg: Message = from_dict(cls, data)
    return msg


def decode_command(line: bytes | str) -> Command:
    """An orchestrator command from one JSON line; ValueError for an unknown kind."""
    data = json.loads(line)
    cls = COMMANDS.get(data.pop(COMMAND_KEY, None))
    if cls is None:
        raise ValueError(f"unknown command {line!r}")
    cmd: Command = from_dict(cls, data)
    return cmd
