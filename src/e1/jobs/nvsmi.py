"""Every question e1 asks nvidia-smi, in one place (no torch import: planning and GPU claims use it).

nvidia-smi ignores CUDA_VISIBLE_DEVICES: it numbers GPUs in PCI-bus order and names them by UUID.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

_GPU_LINE = re.compile(r"^GPU (\d+): (.*?) \(UUID: (GPU-[0-9A-Za-z-]+)\)")
STATE_FIELDS = ("name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.limit,"
                "temperature.gpu,memory.used,memory.total,pci.bus_id")


@dataclass
class Gpu:
    id: str  # what CUDA_VISIBLE_DEVICES gets for this GPU
    index: str | None = None  # nvidia-smi index, when known
    uuid: str | None = None  # GPU-..., when known
    name: str | None = None


def run(args: list[str], timeout: float = 20.0) -> str | None:
    """nvidia-smi's stdout for `args`; None when it is absent, fails or hangs."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def list_gpus() -> list[Gpu] | None:
    """GPUs as `nvidia-smi -L` lists them (physical indices, UUIDs); None when nvidia-smi is unavailable."""
    text = run(["-L"])
    if text is None:
        return None
    gpus = []
    for line in text.splitlines():
        m = _GPU_LINE.match(line)  # MIG lines are indented and do not match
        if m:
            gpus.append(Gpu(id=m.group(3), index=m.group(1), uuid=m.group(3), name=m.group(2)))
    return gpus


def state(smi_id: str) -> dict[str, str]:
    """Clocks (MHz), power limit (W), temperature (C), memory and bus id of one physical GPU."""
    text = run([f"--id={smi_id}", f"--query-gpu={STATE_FIELDS}", "--format=csv,noheader,nounits"])
    if not text:
        return {"nvidia_smi": "unavailable"}
    values = [v.strip() for v in text.splitlines()[0].split(",")]
    return dict(zip(STATE_FIELDS.split(","), values))


def compute_apps() -> list[dict[str, str]]:
    """Every compute process nvidia-smi sees: pid, process name, used memory (MiB), GPU bus id."""
    text = run(["--query-compute-apps=pid,process_name,used_memory,gpu_bus_id", "--format=csv,noheader,nounits"])
    apps = []
    for line in (text or "").splitlines():
        parts = [v.strip() for v in line.split(",")]
        if len(parts) >= 4:
            apps.append({"pid": parts[0], "name": parts[1], "used_memory_mib": parts[2], "bus_id": parts[3]})
    return apps
