"""Live progress of a run: tenants loading, window countdown, tokens so far per tenant.

On a terminal this is a rich Live table refreshed a few times a second; elsewhere (CI, a
cluster job's log) one plain line every ``log_every_s`` seconds, so logs stay readable.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

if TYPE_CHECKING:
    from multitenant.orchestrator import Orchestrator


class LiveProgress:
    def __init__(self, title: str, enabled: bool = True, log_every_s: float = 5.0) -> None:
        self.console = Console(stderr=True)
        self.title = title
        self.enabled = enabled
        self.interactive = enabled and self.console.is_terminal
        self.log_every_s = log_every_s
        self._live: Live | None = None
        self._last_log = 0.0
        self._first_tokens: dict[str, tuple[int, int]] = {}

    def __enter__(self) -> LiveProgress:
        if self.interactive:
            self._live = Live(Table(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def _rows(self, orch: Orchestrator) -> list[tuple[str, str, str, str, str]]:
        now = time.monotonic_ns()
        rows = []
        for name, tp in orch.tenants.items():
            toks = int(tp.progress.get("tokens", 0))
            reqs = int(tp.progress.get("requests", 0))
            # Rate since the first progress message of the measured phase.
            if tp.state == "running" and name not in self._first_tokens:
                self._first_tokens[name] = (now, toks)
            rate = ""
            if name in self._first_tokens and now > self._first_tokens[name][0]:
                t_first, tok_first = self._first_tokens[name]
                rate = f"{(toks - tok_first) / ((now - t_first) / 1e9):.1f}"
            rows.append((name, tp.state, str(reqs), str(toks), rate))
        return rows

    def _window_text(self, orch: Orchestrator) -> str:
        if orch.window is None:
            return "waiting for every tenant to be ready"
        t0, t1 = orch.window
        now = time.monotonic_ns()
        if now < t0:
            return f"window starts in {(t0 - now) / 1e9:.1f} s"
        if t1 is None:
            return f"window open for {(now - t0) / 1e9:.0f} s (ends on request counts)"
        return f"window {(now - t0) / 1e9:.0f} / {(t1 - t0) / 1e9:.0f} s"

    def update(self, orch: Orchestrator) -> None:
        if not self.enabled:
            return
        rows = self._rows(orch)
        if self._live is not None:
            table = Table(title=f"{self.title} — {self._window_text(orch)}")
            for col in ("tenant", "state", "requests", "tokens", "tok/s"):
                table.add_column(col, justify="right" if col not in ("tenant", "state") else "left")
            for r in rows:
                table.add_row(*r)
            self._live.update(table)
            return
        now = time.monotonic()
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            parts = [f"{n}: {s}, {q} req, {k} tok" + (f", {r} tok/s" if r else "") for n, s, q, k, r in rows]
            self.console.print(f"[{self.title}] {self._window_text(orch)} | " + " | ".join(parts), markup=False, highlight=False, soft_wrap=True)
