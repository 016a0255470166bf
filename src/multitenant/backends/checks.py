"""Small checks the backends' ``validate`` functions share (one-line ``ConfigError``s)."""

from __future__ import annotations

from typing import Any

from multitenant.config.schema import fail


def positive(where: str, value: Any, what: str, allow_none: bool = False) -> None:
    """Refuse ``value`` unless it is > 0 (or None, with ``allow_none``)."""
    if value is None and allow_none:
        return
    if value is None or not value > 0:
        raise fail(
            where, f"{what} must be > 0 (got {value})", f"set {where.rsplit('.', 1)[-1]} to a positive value"
        )
