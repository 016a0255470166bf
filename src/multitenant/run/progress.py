"""Live progress of a run: tenants loading, window countdown, tokens so far per tenant.

On a terminal this is a rich Live table refreshed a few times a second; elsewhere (CI, a
cluster job's log) one plain line every ``log_every_s`` seconds, so logs stay readable.

While the table is live, log records bound for the terminal go through its console, which
prints them above the table: written straight to the terminal (Hydra's log handler holds
the stream it was given at start), a line landed inside the table, the next redraw moved up
and erased from the wrong place, and truncated copies of old tables stayed on screen.
"""

from __future__ import annotations

import logging
import time
from typing import IO, TYPE_CHECKING, Any

from rich.console import Console
from rich.file_proxy import FileProxy
from rich.live import Live
from rich.table import Table

if TYPE_CHECKING:
    from multitenant.run.orchestrator import Orchestrator
    from multitenant.run.tenants import TenantProc


class LiveProgress:
    def __init__(self, title: str, enabled: bool = True, log_every_s: float = 5.0, console: Console | None = None) -> None:
        self.console = console if console is not None else Console(stderr=True)
        self.title = title
        self.enabled = enabled
        self.interactive = enabled and self.console.is_terminal
        self.log_every_s = log_every_s
        self._live: Live | None = None
        self._last_log = 0.0
        self._rerouted: list[tuple[logging.StreamHandler[Any], IO[str]]] = []

    def __enter__(self) -> LiveProgress:
        if self.interactive:
            self._live = Live(Table(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
            self._route_terminal_logs()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            for handler, stream in self._rerouted:
                handler.setStream(stream)
            self._rerouted.clear()
            self._live.__exit__(*exc)

    def _route_terminal_logs(self) -> None:
        """Point every log handler that writes to a terminal at the live console (above the
        table) until the table ends; handlers writing to files or pipes are left alone."""
        loggers = [logging.getLogger()] + [
            lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
        ]
        for lg in loggers:
            for handler in lg.handlers:
                if not isinstance(handler, logging.StreamHandler) or isinstance(handler.stream, FileProxy):
                    continue
                stream = handler.stream
                try:
                    tty = bool(stream.isatty())
                except (AttributeError, ValueError, OSError):
                    tty = False
                if tty:
                    handler.setStream(FileProxy(self.console, stream))
                    self._rerouted.append((handler, stream))

    def _rows(self, orch: Orchestrator) -> list[tuple[str, str, str, str, str]]:
        rows = []
        for name, tp in orch.tenants.items():
            toks = tp.counts.tokens if tp.counts is not None else 0
            reqs = tp.counts.requests if tp.counts is not None else 0
            rows.append((name, state_text(tp.state, tp.final_status), str(reqs), str(toks), rate_text(tp)))
        return rows

    def _window_text(self, orch: Orchestrator) -> str:
        return window_text(orch.window, time.monotonic_ns())

    def update(self, orch: Orchestrator) -> None:
        if not self.enabled:
            return
        rows = self._rows(orch)
        if self._live is not None:
            table = Table(title=f"{self.title} — {self._window_text(orch)}")
            for col in ("tenant", "state", "requests", "tokens", "rate"):
                table.add_column(col, justify="right" if col not in ("tenant", "state") else "left")
            for r in rows:
                table.add_row(*r)
            self._live.update(table)
            return
        now = time.monotonic()
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            self._print_line(orch)

    def _print_line(self, orch: Orchestrator, prefix: str = "") -> None:
        """One plain line: each tenant's state and counts, and when its counts were taken
        (seconds into its own window: tenants report at their own moments)."""
        parts = []
        for (name, state, reqs, toks, rate), tp in zip(self._rows(orch), orch.tenants.values(), strict=True):
            part = f"{name}: {state}, {reqs} req, {toks} tok"
            if (at := counts_age_text(tp)) is not None:
                part += f" at {at}"
            parts.append(part + (f", {rate}" if rate else ""))
        text = f"[{self.title}] {prefix}{self._window_text(orch)} | " + " | ".join(parts)
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def finish(self, orch: Orchestrator, status: str) -> None:
        """The run's last line outside a terminal: every tenant's final counts over its whole
        measured phase (the last periodic line can be seconds old)."""
        if self.enabled and self._live is None:
            self._print_line(orch, prefix=f"{status}: ")


def state_text(state: str, final_status: str | None) -> str:
    """A tenant's state as shown: a tenant that ended other than ok says how (interrupted,
    error), not just ``finished``."""
    if state == "finished" and final_status not in (None, "ok"):
        return str(final_status)
    return state


def rate_text(tp: TenantProc) -> str:
    """Measured-phase rate: the counts of the tenant's last progress message over the time from
    the tenant's own window start to that message (its ``t``). The tenant resets its counts at
    its window start, so messages from before it (warm-up counts) give no rate; tokens/s for
    generate tenants, sequences/s for forward (encoder) tenants."""
    if tp.window is None or tp.counts is None or tp.progress_t_ns is None:
        return ""
    elapsed_s = (tp.progress_t_ns - tp.window[0]) / 1e9
    if elapsed_s <= 0:
        return ""
    if tp.tenant.config.task == "forward":
        return f"{tp.counts.requests / elapsed_s:.1f} seq/s"
    return f"{tp.counts.tokens / elapsed_s:.1f} tok/s"


def counts_age_text(tp: TenantProc) -> str | None:
    """When the tenant's shown counts were taken, in seconds into its own window (``+4.5 s``)."""
    if tp.window is None or tp.progress_t_ns is None or tp.progress_t_ns < tp.window[0]:
        return None
    return f"+{(tp.progress_t_ns - tp.window[0]) / 1e9:.1f} s"


def window_text(window: tuple[int, int | None] | None, now_ns: int) -> str:
    """Where the run is: waiting, counting down, inside the window (never past its length), or
    past its end while the tenants stop."""
    if window is None:
        return "waiting for every tenant to be ready"
    t0, t1 = window
    if now_ns < t0:
        return f"window starts in {(t0 - now_ns) / 1e9:.1f} s"
    if t1 is None:
        return f"window open for {(now_ns - t0) / 1e9:.0f} s (ends on request counts)"
    if now_ns >= t1:
        return f"window of {(t1 - t0) / 1e9:.0f} s closed; stopping tenants"
    return f"window {(now_ns - t0) / 1e9:.0f} / {(t1 - t0) / 1e9:.0f} s"
