"""What a tenant reports about its device when its engine runs the GPU from another process.

A ``vllm`` tenant's engine core and an ``openai`` tenant's server hold the CUDA context; the
tenant process itself must not make one (it would be one more MPS client and take GPU
memory). The SMs such a tenant sees are read by a short-lived probe process started with the
tenant's own environment (its MPS share included), after the engine is up and before ``ready``.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

from multitenant.backends.base import DeviceInfo

# torch reports the SM count under the process's MPS active-thread percentage.
_PROBE = (
    "import json, torch; p = torch.cuda.get_device_properties(0); "
    "print(json.dumps([p.name, int(p.multi_processor_count), int(p.total_memory)]))"
)
PROBE_TIMEOUT_S = 120.0


def cpu_info() -> DeviceInfo:
    """``device_info`` of a tenant on the CPU."""
    return DeviceInfo("cpu", platform.processor() or platform.machine() or "cpu", None, None)


def device_info(engine_device: str) -> DeviceInfo:
    """``device_info`` of a tenant whose engine runs elsewhere; on a GPU from a probe process, on
    failure with ``sms`` None and the reason in ``probe_error`` (the run goes on: this is a
    record, not a requirement)."""
    if not engine_device.startswith("cuda"):
        return cpu_info()
    try:
        res = subprocess.run(
            [sys.executable, "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError((res.stderr.strip().splitlines() or ["no output"])[-1])
        name, sms, total = json.loads(res.stdout.strip().splitlines()[-1])
        return DeviceInfo(engine_device, str(name), int(sms), int(total))
    except (OSError, RuntimeError, ValueError, IndexError, TypeError, subprocess.TimeoutExpired) as e:
        return DeviceInfo(engine_device, None, None, None, probe_error=str(e))
