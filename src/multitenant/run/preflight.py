"""Checks of the machine before a run starts: is the GPU the experiment names usable here?

Without this check a GPU experiment on a machine without a GPU would start, make a folder, and
fail later with a message about ``nvidia-cuda-mps-control`` or a CUDA error from a tenant. NVML
answers the question in milliseconds without a CUDA context (no torch import), so ``mt-run``
asks it first.
"""

from __future__ import annotations

import contextlib
import os

# Tests that drive the MPS path against a fake control daemon run GPU experiments on machines
# without a GPU: they set this, and nothing else should.
SKIP_ENV = "MT_SKIP_GPU_CHECK"


def gpu_problem(device_index: int) -> str | None:
    """Why ``cuda:<device_index>`` is not usable here (one clause), or None when it is."""
    if os.environ.get(SKIP_ENV):
        return None
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return f"no NVIDIA driver answers here (NVML: {' '.join(str(e).split()) or type(e).__name__})"
    try:
        count = int(pynvml.nvmlDeviceGetCount())
    except Exception as e:
        return f"NVML cannot count the GPUs ({e})"
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() != "":
        count = min(count, len([v for v in visible.split(",") if v.strip()]))
    elif visible is not None:
        count = 0  # CUDA_VISIBLE_DEVICES="" hides every GPU
    if count == 0:
        return "no GPU is visible (CUDA_VISIBLE_DEVICES hides them, or the machine has none)"
    if device_index >= count:
        return f"cuda:{device_index} does not exist ({count} GPU(s) visible: cuda:0..cuda:{count - 1})"
    return None
