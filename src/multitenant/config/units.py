"""Units and names of the configuration: memory sizes, devices, the cache folder.

Pure functions of their arguments (and, for the cache folder, the environment); no package
import, so backends and analysis use them freely.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from multitenant.config.schema import ConfigError

PINNED_MEM_RE = re.compile(r"^(?:(\d+)=)?(\d+(?:\.\d+)?)([KMGT])B?$", re.IGNORECASE)
# Binary units: G = 2**30, as MPS reads CUDA_MPS_PINNED_DEVICE_MEM_LIMIT.
MEM_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
CACHE_DIR_ENV = "MT_CACHE_DIR"


def parse_pinned_mem_limit(value: str, device_index: int) -> str:
    """'20G' -> '<device_index>=20G'; '0=20G' is kept. Raises ConfigError on anything else."""
    m = PINNED_MEM_RE.match(value.strip())
    if not m:
        raise ConfigError(f"pinned_mem_limit {value!r} is not a size; write it like 20G, 512M or 0=20G")
    dev, num, unit = m.groups()
    if float(num) <= 0:
        raise ConfigError(f"pinned_mem_limit {value!r} must be positive; write it like 20G")
    return f"{dev if dev is not None else device_index}={num}{unit.upper()}"


def parse_mem_bytes(value: str) -> int:
    """'20G' or '0=20G' -> bytes (binary units)."""
    m = PINNED_MEM_RE.match(value.strip())
    if not m:
        raise ConfigError(f"memory size {value!r} is not a size; write it like 20G, 512M or 0=20G")
    _, num, unit = m.groups()
    return int(float(num) * MEM_UNITS[unit.upper()])


def device_index(device: str) -> int | None:
    """'cuda:1' -> 1, 'cuda' -> 0, 'cpu' -> None."""
    if device == "cpu":
        return None
    if device == "cuda":
        return 0
    m = re.fullmatch(r"cuda:(\d+)", device)
    if not m:
        raise ConfigError(f"device {device!r} is not cpu, cuda or cuda:<index>; set device=cuda:0 or device=cpu")
    return int(m.group(1))


def resolve_cache_dir(configured: str | None) -> Path:
    """The compile/graph cache folder: ``cache_dir`` if set, else ``$MT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/multitenant``, else ``~/.cache/multitenant`` (absolute, ``~`` expanded)."""
    if configured:
        return Path(configured).expanduser().resolve()
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (Path(base).expanduser() / "multitenant").resolve()
