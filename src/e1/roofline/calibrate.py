"""Measured ceilings of the device: dense matmul throughput and device-memory copy bandwidth.

Matmul: C = A @ B for square n x n operands in the run's dtype, 2 n^3 FLOPs each; copy: dst.copy_(src) of a
large buffer, counted as bytes read + bytes written (2 x buffer size). Each measurement repeats a batch of
calls several times and keeps the best batch (best sustained rate). On CUDA every batch is bracketed by
events on the stream and one synchronize ends the whole measurement; on CPU the host clock times each batch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from e1.jobs import env as jobenv
from e1.jobs.io import write_json
from e1.jobs.runtime import resolve_device
from e1.model.build import resolve_dtype

# (matmul sizes, copy buffer bytes, calls per batch, batches): large on a GPU, small enough for CI on a CPU
SETTINGS = {
    "cuda": {"matmul_sizes": [4096, 8192, 16384], "copy_bytes": 2 << 30, "calls": 10, "batches": 5},
    "cpu": {"matmul_sizes": [256, 512], "copy_bytes": 64 << 20, "calls": 3, "batches": 3},
}


def best_seconds_per_call(fn: Callable[[], Any], device: torch.device, calls: int, batches: int) -> float:
    """Fastest batch of `calls` calls of fn, in seconds per call (one warm-up call first)."""
    fn()
    if device.type == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(batches + 1)]
        marks[0].record()
        for i in range(batches):
            for _ in range(calls):
                fn()
            marks[i + 1].record()
        torch.cuda.synchronize()
        batch_s = [marks[i].elapsed_time(marks[i + 1]) / 1e3 for i in range(batches)]
    else:
        batch_s = []
        for _ in range(batches):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            batch_s.append(time.perf_counter() - t0)
    return min(batch_s) / calls


def matmul_tflops(n: int, device: torch.device, dtype: torch.dtype, calls: int, batches: int) -> float:
    """Best sustained TFLOP/s of an n x n x n matmul (2 n^3 FLOPs per call)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    s = best_seconds_per_call(lambda: torch.mm(a, b, out=out), device, calls, batches)
    return 2 * n**3 / s / 1e12


def copy_gbps(nbytes: int, device: torch.device, dtype: torch.dtype, calls: int, batches: int) -> float:
    """Best sustained GB/s of a device-to-device copy of `nbytes`, counting bytes read + bytes written."""
    numel = nbytes // torch.empty((), dtype=dtype).element_size()
    src = torch.ones(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    s = best_seconds_per_call(lambda: dst.copy_(src), device, calls, batches)
    return 2 * numel * src.element_size() / s / 1e9


@torch.inference_mode()
def calibrate(device_name: str, dtype_name: str, out_json: str | Path) -> dict[str, Any]:
    """Measure both ceilings on `device_name` in `dtype_name`; write and return the JSON record."""
    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name)
    s = SETTINGS["cuda" if device.type == "cuda" else "cpu"]
    per_size = {str(n): matmul_tflops(n, device, dtype, s["calls"], s["batches"]) for n in s["matmul_sizes"]}
    bw = copy_gbps(s["copy_bytes"], device, dtype, s["calls"], s["batches"])
    env = jobenv.capture(device)
    result = {
        "device": env["device_name"],
        "device_type": device.type,
        "dtype": dtype_name,
        "matmul_tflops": max(per_size.values()),
        "matmul_tflops_by_size": per_size,
        "copy_gbps": bw,
        "copy_bytes": s["copy_bytes"],
        "method": (
            f"matmul: torch.mm of square {dtype_name} operands of each size, 2 n^3 FLOPs per call, best of "
            f"{s['batches']} batches of {s['calls']} calls after one warm-up call; matmul_tflops = the best size. "
            f"copy: dst.copy_(src) of {s['copy_bytes'] / 2**20:.0f} MiB on the device, bytes = read + write "
            f"(2 x buffer), same batches. "
            + ("Timed by CUDA events on the stream, one synchronize at the end."
               if device.type == "cuda" else "CPU: host clock per batch; small sizes, labelled CPU, not a GPU ceiling.")
        ),
        "torch": env["torch"],
        "gpu_claim": env.get("gpu_claim"),  # which GPU this job claimed on a multi-GPU node (e1.jobs.claims)
    }
    write_json(out_json, result)
    return result
