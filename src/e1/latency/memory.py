"""Device memory per stage, from one untimed eager pass of a configuration's request (CUDA only).

For each stage: the peak memory allocated while it ran (torch.cuda.max_memory_allocated after resetting the
peak at its start) and the increase over what was allocated when it started; for the KV cache: the bytes of
keys and values after prefill and after the last decode step. The decode stage runs min(N-1, DECODE_STEPS)
steps; a dynamic cache grows by the same bytes every position, so its size after all N-1 steps is prefill
bytes / T x (T + N - 1). On a CPU nothing is measured (None, with the reason).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from e1.model.graphs import GraphedRequest

DECODE_STEPS = 16
GIB = 2**30


def cache_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.inference_mode()
def stage_memory(model: nn.Module, inp: Any, new_tokens: int, graphs: GraphedRequest | None = None
                 ) -> dict[str, Any]:
    device = inp.input_ids.device
    if device.type != "cuda":
        return {"measured": False, "why": "device memory is measured on CUDA devices only"}
    out: dict[str, Any] = {"measured": True}

    def stage(name: str, fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out[name] = {"peak_gib": peak / GIB, "increase_gib": (peak - start) / GIB}
        return result

    feats = stage("vision_encoder", lambda: model.stage_vision(inp))
    embeds = stage("projector", lambda: model.stage_projector(feats, inp))
    logits, cache = stage("prefill", lambda: model.stage_prefill(inp, embeds))
    t = int(inp.input_ids.shape[1])
    after_prefill = cache_bytes(cache)
    steps = min(new_tokens - 1, DECODE_STEPS)

    def decode():
        token = logits.argmax(dim=-1, keepdim=True)
        with model.decode_experts():
            for _ in range(steps):
                token = model.decode_step(token, cache)[0].argmax(dim=-1, keepdim=True)

    if steps > 0:
        stage("decode", decode)
    out["decode_steps_in_pass"] = steps
    out["kv_cache_bytes"] = {"after_prefill": after_prefill,
                             "after_decode": after_prefill // t * (t + new_tokens - 1)}
    if graphs is not None:
        out["graphs"] = {"static_kv_cache_bytes": graphs.kv.nbytes(), "static_kv_slots": graphs.kv.max_len}
    out["allocated_gib_after"] = torch.cuda.memory_allocated() / GIB
    out["method"] = __doc__.split("\n\n", 1)[1].strip().replace("\n", " ")
    return out
