"""How fast this host drives the device: a fixed microbenchmark every GPU job runs once before its timed runs.

Host-bound stages (eager decode: the GPU idles most of a step) run as fast as the host launches kernels, so
the same GPU gives different stage times on different hosts. Recorded beside every summary:
- launch_us: host time to enqueue one tiny kernel (in-place add on one element), over 1,000 launches;
- launch_drain_us: the same including the device finishing them (one synchronize at the end);
- dispatch_us: host time of one small eager op on the CPU (torch.add on 8 floats, out= preallocated), over
  1,000 ops: PyTorch's dispatcher, the path every eager module call takes.
Each is the median of 5 repetitions.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

N_OPS = 1000
REPEATS = 5


def _per_op_us(fn, sync=None) -> float:
    t0 = time.perf_counter()
    for _ in range(N_OPS):
        fn()
    if sync:
        sync()
    return (time.perf_counter() - t0) / N_OPS * 1e6


def host_bench(device: torch.device) -> dict[str, Any]:
    a, out = torch.zeros(8), torch.empty(8)
    dispatch = [_per_op_us(lambda: torch.add(a, 1.0, out=out)) for _ in range(REPEATS)]
    result: dict[str, Any] = {"dispatch_us": statistics.median(dispatch), "ops": N_OPS, "repeats": REPEATS}
    if device.type == "cuda":
        x = torch.zeros(1, device=device)
        torch.cuda.synchronize()
        launch, drain = [], []
        for _ in range(REPEATS):
            launch.append(_per_op_us(lambda: x.add_(1.0)))
            torch.cuda.synchronize()
            drain.append(_per_op_us(lambda: x.add_(1.0), torch.cuda.synchronize))
        result.update(launch_us=statistics.median(launch), launch_drain_us=statistics.median(drain))
    else:
        result.update(launch_us=None, launch_drain_us=None)
    result["method"] = __doc__.split("\n\n", 1)[1].strip().replace("\n", " ")
    return result
