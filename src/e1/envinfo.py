"""The environment a measurement ran in: device, clocks, software, neighbours on the GPU."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from typing import Any

import torch
import transformers

from e1 import gpus

_SMI_FIELDS = (
    "name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.limit,"
    "temperature.gpu,memory.used,memory.total,pci.bus_id"
)


def _smi(args: list[str]) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def gpu_state(index: int) -> dict[str, Any]:
    """nvidia-smi readings for torch's cuda:<index> (clocks in MHz, power in W, temperature in C).

    nvidia-smi ignores CUDA_VISIBLE_DEVICES: it is asked for the physical GPU (the claimed one, e1.gpus).
    """
    text = _smi([f"--id={gpus.smi_id(index)}", f"--query-gpu={_SMI_FIELDS}", "--format=csv,noheader,nounits"])
    if not text:
        return {"nvidia_smi": "unavailable"}
    values = [v.strip() for v in text.splitlines()[0].split(",")]
    return dict(zip(_SMI_FIELDS.split(","), values))


def gpu_processes(index: int) -> list[dict[str, str]]:
    """Compute processes on the GPU other than this one."""
    bus = gpu_state(index).get("pci.bus_id")
    text = _smi(["--query-compute-apps=pid,process_name,used_memory,gpu_bus_id", "--format=csv,noheader,nounits"])
    procs = []
    for line in (text or "").splitlines():
        pid, name, mem, app_bus = (v.strip() for v in line.split(",")[:4])
        if pid != str(os.getpid()) and (bus is None or app_bus == bus):
            procs.append({"pid": pid, "name": name, "used_memory_mib": mem})
    return procs


def capture(device: torch.device) -> dict[str, Any]:
    """Software and hardware facts, read once per job."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device_type": device.type,
        "gpu_claim": gpus.current(),  # which GPU this job claimed (e1.gpus); None: nothing claimed
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(
            device_name=props.name,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            sm_count=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            nvidia_smi_id=gpus.smi_id(index),  # the physical GPU the nvidia-smi readings are of
            gpu_before=gpu_state(index),
            other_gpu_processes=gpu_processes(index),
        )
    else:
        n = info["cpu_threads"]
        info["device_name"] = f"CPU ({info['cpu']}, {n} thread{'s' if n != 1 else ''})"
    return info
