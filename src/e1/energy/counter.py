"""How often the GPU's energy counter updates, and what one read of it costs.

The counter advances in steps; its update period P bounds how precisely any window can be measured
(e1.energy.windows sizes windows from it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from itertools import pairwise

from e1.energy.nvml import GpuSensors


def update_period(sensors: GpuSensors, duration_s: float = 2.0,
                  clock: Callable[[], float] = time.perf_counter) -> dict:
    """Poll energy_mj() back to back for `duration_s` and time the changes of its value.

    A change is timed at the end of the read that first shows it, so each interval is exact to one read.
    The stretch before the first change is not an interval. Returns the intervals' median, min and max (ms)
    and count, the median cost of one read (us), the median step of the counter (mJ) and the number of reads;
    with fewer than two changes the interval statistics are None and `reason` says why.
    """
    changes_s, steps_mj, reads_s = [], [], []
    start_s = clock()
    last_mj = sensors.energy_mj()
    while True:
        t0_s = clock()
        value_mj = sensors.energy_mj()
        t1_s = clock()
        reads_s.append(t1_s - t0_s)
        if value_mj != last_mj:
            changes_s.append(t1_s)
            steps_mj.append(value_mj - last_mj)
            last_mj = value_mj
        if t1_s - start_s >= duration_s:
            break
    intervals_ms = [(b - a) * 1e3 for a, b in pairwise(changes_s)]
    out = {"median_ms": None, "min_ms": None, "max_ms": None, "intervals": len(intervals_ms),
           "read_us": statistics.median(reads_s) * 1e6, "step_mj": statistics.median(steps_mj) if steps_mj else None,
           "reads": len(reads_s), "duration_s": t1_s - start_s, "reason": None}
    if intervals_ms:
        out.update(median_ms=statistics.median(intervals_ms), min_ms=min(intervals_ms), max_ms=max(intervals_ms))
    else:
        out["reason"] = f"the counter changed {len(changes_s)} time(s) in {duration_s} s"
    return out
