"""A measure job's energy phase: the four stages of its own request, each run back to back in counter-sized
windows after the timed runs (so the timings are not perturbed), and the GPU's state during the timed runs.

One call of each stage, repeatable back to back on the run's backend (eager, or the CUDA-graph replays):
  vision_encoder, projector   the stage on the request's crops / features
  prefill                     the prompt's prefill (its KV cache refilled each call)
  decode                      one decode step at the request's mean context: the cache is filled to
                              T + (N-1)//2 positions once, and each call rewinds it there and steps once
Per request = vision + projector + prefill + (N-1) x decode step; per generated token = per request / N.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from e1.energy.counter import update_period
from e1.energy.nvml import GpuSensors, open_sensors
from e1.energy.windows import not_measured, request_energy, stage_energy
from e1.model.graphs import GraphedRequest
from e1.names import STAGES


def sensors_for(device: torch.device) -> tuple[GpuSensors | None, str]:
    """NVML sensors of the job's GPU (matched by UUID), or None and why (CPU, no driver, no counter)."""
    if device.type != "cuda":
        return None, f"device {device.type!r} has no energy counter (NVIDIA GPUs only)"
    return open_sensors(str(torch.cuda.get_device_properties(device).uuid))


@torch.inference_mode()
def stage_calls(model: nn.Module, inp: Any, n_new: int, graphs: GraphedRequest | None
                ) -> dict[str, Callable[[], None]]:
    """One call of each stage (module doc), on the backend the job was timed with."""
    t = inp.input_ids.shape[1]
    mid = t + (n_new - 1) // 2  # cached positions before the decode step that is repeated
    if graphs is not None:
        graphs.load(inp)
        graphs.vision()
        graphs.project()
        graphs.prefill()
        for _ in range(mid - t):
            graphs.step()

        def rewind_step() -> None:
            graphs.kv.pos.fill_(mid)
            graphs.step()

        calls = {"vision_encoder": graphs.vision, "projector": graphs.project, "prefill": graphs.prefill,
                 "decode": rewind_step}
    else:
        feats = model.stage_vision(inp)
        embeds = model.stage_projector(feats, inp)
        logits, cache = model.stage_prefill(inp, embeds)
        token = logits.argmax(-1, keepdim=True)
        with model.decode_experts():
            for _ in range(mid - t):
                logits, cache = model.decode_step(token, cache)
                token = logits.argmax(-1, keepdim=True)

        def eager_step() -> None:
            cache.crop(mid)
            with model.decode_experts():
                model.decode_step(token, cache)

        calls = {"vision_encoder": lambda: model.stage_vision(inp),
                 "projector": lambda: model.stage_projector(feats, inp),
                 "prefill": lambda: model.stage_prefill(inp, embeds),
                 "decode": eager_step}
    if n_new < 2:
        calls.pop("decode")
    return calls


def job_energy(model: nn.Module, inp: Any, n_new: int, graphs: GraphedRequest | None,
               sensors: GpuSensors | None, why: str, stage_ms: dict[str, float], settings: dict[str, int],
               log: Callable[[str], None]) -> dict[str, Any]:
    """The energy phase of one job: counter period, per-stage J per call (gross and net of idle), per request
    and per token. stage_ms: the timed runs' medians (decode: per step). settings: repeats, min_periods."""
    if sensors is None:
        return not_measured(why)
    if not settings["repeats"]:
        return not_measured("energy.repeats is 0 in config.yaml")
    device = next(model.parameters()).device
    period = update_period(sensors, duration_s=1.0)
    if period.get("reason"):
        return not_measured(f"the energy counter did not update ({period['reason']})")
    log(f"energy counter updates every {period['median_ms']:.1f} ms (median of {period['intervals']} intervals; "
        f"one read {period['read_us']:.0f} µs)")
    calls = stage_calls(model, inp, n_new, graphs)
    with torch.inference_mode():
        result = stage_energy(calls, {s: stage_ms[s] for s in calls}, sensors, lambda: torch.cuda.synchronize(device),
                              period_ms=period["median_ms"], repeats=settings["repeats"],
                              min_periods=settings["min_periods"], log=log)
    result["counter"] = period
    result["request"] = request_energy(result, n_new)
    result["stages_order"] = [s for s in STAGES if s in calls]
    return result
