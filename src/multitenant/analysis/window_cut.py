"""How a run's window was cut: which tenant set its start and which its end, and why.

The run's window is [max of the tenants' starts, min of their ends] (``metrics``), a tenant's end
being min(its ``window.t1``, its last measured token; a forward tenant's last completed request).
A tenant that stops emitting before its phase ends (an open-loop tenant with no request in
flight near the end, say) shortens everyone's window; without a word that looks like a bug. So
the run says, as data (summary.json ``window_cut``) and as one sentence (terminal, summary.md,
report.html), which tenant set each edge, the edge's offset from t0 (the earliest tenant start),
and for the end whether it was that tenant's phase end or its last token.
"""

from __future__ import annotations

from dataclasses import dataclass

from multitenant.analysis.names import (
    NS_PER_S,
    WINDOW_END_LAST_REQUEST,
    WINDOW_END_LAST_TOKEN,
    WINDOW_END_PHASE,
)
from multitenant.schema import WindowCut


@dataclass(frozen=True)
class TenantBounds:
    """One tenant's phase [t0, t1] (t1 None: open-ended) and its last measured token (or, for a
    forward tenant, completed request); None when it has none."""

    name: str
    t0: int
    t1: int | None
    last: int | None
    forward: bool

    @property
    def end(self) -> int | None:
        candidates = [t for t in (self.t1, self.last) if t is not None]
        return min(candidates) if candidates else None

    @property
    def end_reason(self) -> str:
        if self.t1 is not None and (self.last is None or self.t1 <= self.last):
            return WINDOW_END_PHASE
        return WINDOW_END_LAST_REQUEST if self.forward else WINDOW_END_LAST_TOKEN


def window_cut(bounds: list[TenantBounds], window: tuple[int, int] | None) -> WindowCut | None:
    """The facts of the cut (module docstring), ``text`` the sentence; None without a window."""
    if window is None or not bounds:
        return None
    t0 = min(b.t0 for b in bounds)
    starter = next(b for b in bounds if b.t0 == window[0])
    # On a tie, a phase end is the plainer explanation than a last token at the same instant.
    enders = [b for b in bounds if b.end == window[1]]
    ender = next((b for b in enders if b.end_reason == WINDOW_END_PHASE), enders[0])
    cut = WindowCut(
        window_s=(window[1] - window[0]) / NS_PER_S,
        start_tenant=starter.name,
        start_s=(window[0] - t0) / NS_PER_S,
        all_start_together=all(b.t0 == window[0] for b in bounds),
        end_tenant=ender.name,
        end_reason=ender.end_reason,
        end_s=(window[1] - t0) / NS_PER_S,
        end_tenant_phase_s=None if ender.t1 is None else (ender.t1 - ender.t0) / NS_PER_S,
    )
    cut.text = describe(cut)
    return cut


def describe(cut: WindowCut) -> str:
    """``window 4.439 s: starts at t0 (every tenant's phase start); ends at tenant b's last token
    (4.439 s after t0; its 5 s phase had no token after it)``."""
    if cut.all_start_together:
        start = "t0 (every tenant's phase start)"
    else:
        start = f"tenant {cut.start_tenant}'s phase start ({cut.start_s:.3f} s after t0, the latest start)"
    name, at, phase = cut.end_tenant, f"{cut.end_s:.3f} s after t0", cut.end_tenant_phase_s
    if cut.end_reason == WINDOW_END_PHASE:
        end = f"tenant {name}'s phase end ({at}, its {phase:g} s phase)"
    else:
        last_token = cut.end_reason == WINDOW_END_LAST_TOKEN
        what, after = ("last token", "no token") if last_token else ("last completed request", "no completed request")
        why = f"its {phase:g} s phase had {after} after it" if phase is not None else "its phase has no set end"
        end = f"tenant {name}'s {what} ({at}; {why})"
    return f"window {cut.window_s:.3f} s: starts at {start}; ends at {end}"
