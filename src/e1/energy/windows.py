"""Energy per call of each stage from the GPU's cumulative energy counter, in windows aligned to its updates.

Method. The counter (mJ) advances once per update period P (e1.energy.counter measures P). A window opens on
an update edge (the first read that shows a new value), runs `calls` back-to-back calls of one stage,
synchronises, and closes on the next edge. Both readings are then counter values at update instants, so their
difference is the energy the counter accounted between two of its updates: no partial period at either end.
The window is the host time between the two edges; each edge is seen within one read (tens of us) of the
update, at both ends alike.
The cost of aligning: after the last call the window runs on, idle, until the next update (the tail, 0..P).

  gross J per call = (window energy - idle W x tail s) / calls   the calls' energy over their own run time,
                                                                 the GPU's idle floor included
  net J per call   = (window energy - idle W x window s) / calls the energy above idle

Idle power is measured in an idle window of the same run length right after each stage window (stage, idle,
stage, idle, ...), so each pair sees the same clocks and temperature; each window's net uses its own pair's
idle power. Windows run at least min_periods x P, so what the tail correction leaves (the tail is assumed to
run at idle power) is at most ~1/min_periods of the window.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping

from e1.energy.nvml import GpuSensors
from e1.names import STAGES

METHOD = "edge-aligned windows of back-to-back calls on the cumulative energy counter, idle windows interleaved"
EDGE_TIMEOUT_S = 5.0
Clock = Callable[[], float]


def window_calls(stage_ms: float, period_ms: float, min_periods: int = 20, min_calls: int = 3) -> int:
    """Calls per window: the fewest n with n x stage_ms >= min_periods x period_ms, and at least min_calls.

    The counter's quantisation is one update period at each end (taken out by edge alignment, up to the tail),
    so a window of min_periods periods bounds it at ~1/min_periods of the window.
    """
    if stage_ms <= 0 or period_ms <= 0:
        raise ValueError(f"stage_ms and period_ms must be positive, not {stage_ms} and {period_ms}")
    return max(min_calls, math.ceil(min_periods * period_ms / stage_ms))


def _next_edge(sensors: GpuSensors, clock: Clock) -> tuple[int, float]:
    """(counter mJ, host time s) at the first read that shows a value other than the current one."""
    start_mj, start_s = sensors.energy_mj(), clock()
    while True:
        value_mj = sensors.energy_mj()
        now_s = clock()
        if value_mj != start_mj:
            return value_mj, now_s
        if now_s - start_s > EDGE_TIMEOUT_S:
            raise RuntimeError(f"the energy counter of {sensors.name} did not change in {EDGE_TIMEOUT_S} s")


def measure_window(sensors: GpuSensors, run_calls: Callable[[], None], sync: Callable[[], None],
                   clock: Clock = time.perf_counter) -> dict:
    """One edge-aligned window around run_calls(): energy_j and window_s from edge to edge (tail included).

    sync() runs first, so earlier work does not spill in, and after run_calls(). run_s: opening edge to the
    return of the second sync; tail_s: from there to the closing edge (0..P).
    """
    sync()
    open_mj, open_s = _next_edge(sensors, clock)
    run_calls()
    sync()
    ran_s = clock()
    close_mj, close_s = _next_edge(sensors, clock)
    return {"energy_j": (close_mj - open_mj) / 1e3, "window_s": close_s - open_s,
            "run_s": ran_s - open_s, "tail_s": close_s - ran_s}


def idle_power(sensors: GpuSensors, seconds: float, sync: Callable[[], None], clock: Clock = time.perf_counter,
               sleep: Callable[[float], None] = time.sleep) -> dict:
    """An edge-aligned window with nothing running for `seconds` (then to the next edge): its dict plus idle_w."""
    window = measure_window(sensors, lambda: sleep(seconds), sync, clock)
    return window | {"idle_w": window["energy_j"] / window["window_s"]}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def stage_energy(stages: Mapping[str, Callable[[], None]], stage_ms: Mapping[str, float], sensors: GpuSensors,
                 sync: Callable[[], None], *, period_ms: float, repeats: int = 5, min_periods: int = 20,
                 min_calls: int = 3, clock: Clock = time.perf_counter, sleep: Callable[[float], None] = time.sleep,
                 log: Callable[[str], None] = lambda _: None) -> dict:
    """Gross and net J per call of each stage: median, min, max over `repeats` windows (method: module doc).

    stages[name]() runs one call and must be repeatable back to back (a decode step at a fixed position, a
    graph replay); stage_ms[name] is its latency, which sizes a first, unrecorded window that brings the
    clocks up; the calls of the recorded windows are sized from that window's own ms per call (back-to-back
    calls need not run at the timed latency). Per stage: calls, stage_ms, back_to_back_ms, and the spread of
    window_s, idle_w, gross_j_per_call and net_j_per_call, with every window's numbers.
    """
    out = {"measured": True, "reason": None, "method": METHOD, "period_ms": period_ms, "repeats": repeats,
           "min_periods": min_periods, "stages": {}}
    for name, call in stages.items():
        def run_calls(n: int, call=call) -> None:
            for _ in range(n):
                call()

        first = window_calls(stage_ms[name], period_ms, min_periods, min_calls)
        t0 = clock()
        run_calls(first)
        sync()
        back_to_back_ms = (clock() - t0) * 1e3 / first
        calls = window_calls(back_to_back_ms, period_ms, min_periods, min_calls)
        log(f"energy {name}: {repeats} windows of {calls} calls (~{calls * back_to_back_ms / 1e3:.2f} s; "
            f"{back_to_back_ms:.3g} ms per call back to back, {stage_ms[name]:.3g} ms in the timed runs)")
        windows = []
        for r in range(repeats):
            w = measure_window(sensors, lambda n=calls: run_calls(n), sync, clock)
            idle_w = idle_power(sensors, w["run_s"], sync, clock, sleep)["idle_w"]
            w |= {"idle_w": idle_w, "gross_j_per_call": (w["energy_j"] - idle_w * w["tail_s"]) / calls,
                  "net_j_per_call": (w["energy_j"] - idle_w * w["window_s"]) / calls}
            windows.append(w)
            log(f"energy {name} {r + 1}/{repeats}: {w['gross_j_per_call']:.4g} J/call gross, "
                f"{w['net_j_per_call']:.4g} net of {idle_w:.1f} W idle, window {w['window_s']:.2f} s")
        out["stages"][name] = {"calls": calls, "stage_ms": stage_ms[name], "back_to_back_ms": back_to_back_ms,
                               **{k: _spread([w[k] for w in windows])
                                  for k in ("window_s", "idle_w", "gross_j_per_call", "net_j_per_call")},
                               "windows": windows}
    return out


def not_measured(reason: str) -> dict:
    """stage_energy's top-level keys, with no numbers: for a machine without GPU sensors."""
    return {"measured": False, "reason": reason, "method": METHOD, "period_ms": None, "repeats": None,
            "min_periods": None, "stages": {}}


def j_per_request(stage_j: Mapping[str, float], new_tokens: int) -> float:
    """J of one request generating new_tokens: vision_encoder + projector + prefill + (new_tokens - 1) x decode.

    stage_j["decode"] is one decode step: prefill yields the first new token, each decode step one more.
    """
    if new_tokens < 1:
        raise ValueError(f"a request generates at least one token, not {new_tokens}")
    needed = STAGES if new_tokens > 1 else STAGES[:-1]
    missing = [s for s in needed if s not in stage_j]
    if missing:
        raise ValueError(f"no energy for {missing}")
    return sum(stage_j[s] for s in STAGES[:-1]) + (new_tokens - 1) * stage_j.get("decode", 0.0)


def request_energy(result: dict, new_tokens: int) -> dict:
    """J per request and per generated token (j_per_request / new_tokens), gross and net, from stage medians."""
    if not result["measured"]:
        return {"measured": False, "reason": result["reason"]}
    out = {"measured": True, "new_tokens": new_tokens, "decode_steps": new_tokens - 1}
    for kind in ("gross", "net"):
        per_call = {s: v[f"{kind}_j_per_call"]["median"] for s, v in result["stages"].items()}
        request_j = j_per_request(per_call, new_tokens)
        out[kind] = {"j_per_request": request_j, "j_per_token": request_j / new_tokens}
    return out
