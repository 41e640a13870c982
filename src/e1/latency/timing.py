"""The timing core: a fixed-length greedy loop over a model's stage API (e1.vlm.families), with one mark per boundary.

Convention: N new tokens = 1 prefill forward (its logits give token 1) + N-1 decode steps; EOS ignored.
On CUDA every mark is an event recorded on the current stream and the run ends with one synchronize;
end-to-end is the host clock around that synchronized run. On CPU every mark is the host clock.
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from e1.model.graphs import GraphedRequest
from e1.names import COMP_RANGE, STAGE_RANGE

CONVENTION = (
    "N new tokens = 1 prefill forward (yields token 1) + N-1 decode steps, EOS ignored, greedy; "
    "stages are bracketed by CUDA events on the stream (host clock on CPU) with one synchronize per run; "
    "e2e = host clock around the synchronized run (image preprocessing excluded, reported as 'preprocess'); "
    "unattributed = e2e - sum of the four stages; Python's garbage collector is paused during each run; "
    "experts auto: prefill runs transformers' default experts implementation, decode steps run inside "
    "transformers' own decode policy (what generate() switches to), recorded per stage as experts_used; "
    "backend cuda_graph: each stage is one replay of a graph captured for the configuration (the request's "
    "inputs are copied into static buffers before the clock starts; prefill includes copying its KV cache into "
    "the static cache; each decode step includes its argmax)"
)


@dataclass
class RunTiming:
    stages_ms: dict[str, float]
    decode_steps_ms: list[float]
    e2e_ms: float
    tokens: torch.Tensor = field(repr=False)  # (new_tokens,) generated ids
    experts: dict[str, str | None] = field(default_factory=dict)  # the experts implementation prefill/decode ran

    @property
    def unattributed_ms(self) -> float:
        return self.e2e_ms - sum(self.stages_ms.values())


class Clock:
    """Marks stage boundaries: CUDA events on a CUDA device, host perf_counter otherwise.

    events=False on CUDA records nothing (only the host e2e), to measure the instrumentation's cost.
    """

    def __init__(self, device: torch.device, n_marks: int, events: bool = True):
        self.cuda = device.type == "cuda"
        self.events = events
        if self.cuda and events:
            self._marks = [torch.cuda.Event(enable_timing=True) for _ in range(n_marks)]
        else:
            self._marks = [0.0] * n_marks
        self._i = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # the device is idle before the host clock starts
        self._i = 0
        self._t0 = time.perf_counter()

    def mark(self) -> None:
        if self.cuda:
            if self.events:
                self._marks[self._i].record()
        else:
            self._marks[self._i] = time.perf_counter()
        self._i += 1

    def stop(self) -> float:
        """One synchronize; returns host e2e in ms."""
        if self.cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - self._t0) * 1e3

    def intervals_ms(self) -> list[float]:
        """Durations between consecutive marks (empty when events are off)."""
        if self.cuda and not self.events:
            return []
        m = self._marks[: self._i]
        if self.cuda:
            return [a.elapsed_time(b) for a, b in zip(m, m[1:])]
        return [(b - a) * 1e3 for a, b in zip(m, m[1:])]


@contextmanager
def gc_paused():
    """Keep Python's garbage collector out of the timed region (as timeit does).

    No collection here: a full one costs ~0.2 s with torch and transformers loaded; jobs collect once
    before their warm-up runs.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@torch.inference_mode()
def timed_generate(model: nn.Module, inp: Any, new_tokens: int, events: bool = True,
                   annotate: bool = False, graphs: GraphedRequest | None = None) -> RunTiming:
    """One run of the four stages with forced length `new_tokens`; no host sync inside the run.

    Decode steps run in the model's decode context (experts 'auto': transformers' own decode policy).
    annotate=True wraps every stage, decode step and the sampling in profiler ranges (profile jobs only).
    graphs: run every stage on its static buffers (a CUDA-graph replay once captured) instead of eagerly; the
    inputs are copied into them before the clock starts.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    rng = record_function if annotate else nullcontext
    clock = Clock(inp.input_ids.device, n_marks=4 + new_tokens - 1, events=events)
    experts = {}
    if graphs is not None:
        graphs.load(inp)
    with gc_paused():
        clock.start()
        clock.mark()
        with rng(f"{STAGE_RANGE}vision_encoder"):
            feats = model.stage_vision(inp) if graphs is None else graphs.vision()
        clock.mark()
        with rng(f"{STAGE_RANGE}projector"):
            embeds = model.stage_projector(feats, inp) if graphs is None else graphs.project()
        clock.mark()
        experts["prefill"] = model.experts_in_use()
        with rng(f"{STAGE_RANGE}prefill"):
            if graphs is None:
                logits, cache = model.stage_prefill(inp, embeds)
                with rng(f"{COMP_RANGE}sampling"):
                    token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
            else:
                token = graphs.prefill()
        tokens = [token]
        clock.mark()
        with model.decode_experts():
            experts["decode"] = model.experts_in_use()
            for step in range(1, new_tokens):
                with rng(f"{STAGE_RANGE}decode#{step}"):
                    if graphs is not None:
                        token = graphs.step()
                    else:
                        logits, cache = model.decode_step(token, cache)
                        with rng(f"{COMP_RANGE}sampling"):
                            token = logits.argmax(dim=-1, keepdim=True)
                tokens.append(token)
                clock.mark()
        e2e = clock.stop()
    if graphs is not None and graphs.graphs:  # replays run what each stage was captured with
        experts = {"prefill": graphs.experts["prefill"], "decode": graphs.experts["decode"]}
    iv = clock.intervals_ms()
    if iv:
        steps = iv[3:]
        stages = {"vision_encoder": iv[0], "projector": iv[1], "prefill": iv[2], "decode": float(sum(steps))}
    else:
        steps, stages = [], {}
    return RunTiming(stages_ms=stages, decode_steps_ms=steps, e2e_ms=e2e, tokens=torch.cat(tokens, 1)[0],
                     experts=experts)
