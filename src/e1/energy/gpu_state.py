"""The GPU's clocks, power, temperature and clock event reasons, sampled on a thread during a timed block.

Flags (summary): `throttled` when any sample shows a reason that holds the clock down (THROTTLE_REASONS);
`clock_dropped` when the lowest SM clock of the busy samples (GpuIdle not set) is below drop_fraction x the
highest: the max, not the median, so a drop lasting over half the block still counts, and idle samples are
left out because a GPU with nothing to run lowers its clock without slowing any work; `flagged` = either.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Self

from e1.energy.nvml import GPU_IDLE, THROTTLE_MASK, THROTTLE_REASONS, GpuSensors, decode_reasons

QUANTITIES = ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temperature_c")


class GpuStateSampler:
    """`with GpuStateSampler(sensors): timed()` samples every interval_s on a daemon thread; then summary().

    Sensor errors never reach the timed code: a failed read leaves that quantity out of its sample and is
    counted in summary()["errors"]. With sensors None, summary() says so and why (`reason`).
    """

    def __init__(self, sensors: GpuSensors | None, interval_s: float = 0.05, drop_fraction: float = 0.95,
                 reason: str = "no GPU sensors", clock: Callable[[], float] = time.perf_counter):
        self.sensors, self.interval_s, self.drop_fraction, self.reason = sensors, interval_s, drop_fraction, reason
        self._clock = clock
        self._samples: list[dict] = []
        self._errors: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        if self.sensors is not None:
            self._thread = threading.Thread(target=self._loop, name="e1-gpu-state", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, 4 * self.interval_s))
            if self._thread.is_alive():
                self._count_error("sampler thread still running after the block (a sensor read hangs?)")

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval_s):
                return

    def _count_error(self, message: str) -> None:
        self._errors[message] = self._errors.get(message, 0) + 1

    def _read(self, fn: Callable[[], object]) -> object:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001  any sensor failure is recorded, never raised into the timed code
            self._count_error(f"{fn.__name__}: {type(e).__name__}: {e}")
            return None

    def sample(self) -> None:
        """Take one sample now (the thread calls this; tests may call it directly)."""
        s = self.sensors
        sample = {"t_s": self._clock()}
        clocks = self._read(s.clocks_mhz)
        if clocks is not None:
            sample["sm_clock_mhz"], sample["mem_clock_mhz"] = clocks
        power_mw = self._read(s.power_mw)
        if power_mw is not None:
            sample["power_w"] = power_mw / 1e3
        temperature = self._read(s.temperature_c)
        if temperature is not None:
            sample["temperature_c"] = temperature
        reasons = self._read(s.throttle_reasons)
        if reasons is not None:
            sample["reasons"] = reasons
        self._samples.append(sample)

    def summary(self) -> dict:
        """samples, min/median/max per quantity, reasons seen, clock_dropped, throttled, flagged, errors.

        throttle_reasons: the flagging reasons seen in any sample; info_reasons: the others seen (informational,
        or bits not named in e1.energy.nvml).
        """
        if self.sensors is None:
            return {"measured": False, "reason": self.reason}
        samples = list(self._samples)
        out: dict = {"measured": True, "samples": len(samples), "interval_s": self.interval_s,
                     "span_s": samples[-1]["t_s"] - samples[0]["t_s"] if samples else None,
                     "drop_fraction": self.drop_fraction}
        for q in QUANTITIES:
            values = [s[q] for s in samples if q in s]
            out[q] = ({"min": min(values), "median": statistics.median(values), "max": max(values)}
                      if values else None)
        seen = 0
        for s in samples:
            seen |= s.get("reasons", 0)
        out["throttle_reasons"] = [n for n in decode_reasons(seen) if n in THROTTLE_REASONS.values()]
        out["info_reasons"] = [n for n in decode_reasons(seen) if n not in THROTTLE_REASONS.values()]
        out["throttled_samples"] = sum(1 for s in samples if s.get("reasons", 0) & THROTTLE_MASK)
        busy_mhz = [s["sm_clock_mhz"] for s in samples
                    if "sm_clock_mhz" in s and not s.get("reasons", 0) & GPU_IDLE]
        out["busy_sm_clock_mhz"] = {"min": min(busy_mhz), "max": max(busy_mhz)} if busy_mhz else None
        out["clock_dropped"] = bool(busy_mhz) and min(busy_mhz) < self.drop_fraction * max(busy_mhz)
        out["throttled"] = out["throttled_samples"] > 0
        out["flagged"] = out["clock_dropped"] or out["throttled"]
        out["errors"] = dict(self._errors)
        return out
