"""NVML energy counter on this GPU: its update period, idle power, and a sanity check of the counter against
sampled power x time over a long matmul loop. Prints JSON (issue 14's H200 check).

  python3 benchmarks/energy_sanity.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from e1.energy.counter import update_period
from e1.energy.stages import sensors_for
from e1.energy.windows import idle_power, measure_window


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    device = torch.device("cuda")
    sensors, why = sensors_for(device)
    if sensors is None:
        raise SystemExit(why)
    sync = torch.cuda.synchronize
    out = {"gpu": torch.cuda.get_device_name(device), "sensors": sensors.name,
           "update_period": update_period(sensors, duration_s=3.0)}
    out["idle"] = idle_power(sensors, a.seconds, sync)
    x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(20):
        x @ x
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        x @ x
    sync()
    per_ms = (time.perf_counter() - t0) / 10 * 1e3
    calls = max(1, int(a.seconds * 1e3 / per_ms))
    power_mw: list[int] = []
    stop = threading.Event()

    def sample() -> None:  # NVML's own power reading, every 20 ms, beside the energy counter
        while not stop.is_set():
            power_mw.append(sensors.power_mw())
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    def loop() -> None:
        for _ in range(calls):
            torch.mm(x, x, out=y)

    y = torch.empty_like(x)
    w = measure_window(sensors, loop, sync)
    stop.set()
    th.join()
    mean_w = statistics.mean(power_mw) / 1e3
    flops = 2 * 8192 ** 3 * calls
    out["matmul_loop"] = {
        "shape": "8192x8192 @ 8192x8192 bf16", "calls": calls, "ms_per_call": per_ms, "window": w,
        "counter_w": w["energy_j"] / w["window_s"], "sampled_power_w_mean": mean_w, "power_samples": len(power_mw),
        "counter_over_sampled_power_x_time": w["energy_j"] / (mean_w * w["window_s"]),
        "tflops": flops / w["run_s"] / 1e12, "j_per_tflop": w["energy_j"] / (flops / 1e12)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
