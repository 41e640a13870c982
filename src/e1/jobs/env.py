"""The environment a measurement ran in: device, clocks, software, neighbours on the GPU."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import transformers

from e1.jobs import claims, nvsmi


def gpu_state(index: int) -> dict[str, Any]:
    """nvidia-smi readings for torch's cuda:<index>: of the physical GPU this job claimed (e1.jobs.claims)."""
    return nvsmi.state(claims.smi_id(index))


def gpu_processes(bus: str | None) -> list[dict[str, str]]:
    """Compute processes on the GPU at PCI `bus` (all GPUs when None) other than this one."""
    return [{k: a[k] for k in ("pid", "name", "used_memory_mib")} for a in nvsmi.compute_apps()
            if a["pid"] != str(os.getpid()) and (bus is None or a["bus_id"] == bus)]


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo), or what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def capture(device: torch.device) -> dict[str, Any]:
    """Software and hardware facts, read once per job."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "device_type": device.type,
        "gpu_claim": claims.current(),  # which GPU this job claimed (e1.jobs.claims); None: nothing claimed
        "cpu_claim": claims.current_cpu(),  # the host's CPU-measurement lock, for CPU jobs
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
            nvidia_smi_id=claims.smi_id(index),  # the physical GPU the nvidia-smi readings are of
        )
        info["gpu_before"] = gpu_state(index)
        info["other_gpu_processes"] = gpu_processes(info["gpu_before"].get("pci.bus_id"))
    else:
        n = info["cpu_threads"]
        info["device_name"] = f"CPU ({info['cpu']}, {n} thread{'s' if n != 1 else ''})"
    return info
