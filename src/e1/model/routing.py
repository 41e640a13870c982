"""Expert routing: the `moe_routing` knob, and the tokens each expert receives in one request.

learned   the router's own top-k choice (the model as built or loaded).
balanced  the router still runs (its matmul, softmax in fp32 and top-k, so every FLOP and kernel stays), and
          its top-k weights are kept; only the expert ids are replaced. The T*k (token, slot) pairs of one
          forward, in order (token-major), take experts (offset + 0, 1, 2, ...) mod E. A prefill (T > 1)
          starts at offset 0; each forward then leaves offset at (offset + T*k) mod E, a device counter per
          layer. So each forward gives every expert floor or ceil of T*k/E slots, each token k distinct experts
          (k <= E), consecutive decode steps (T = 1) rotate through all E experts, and every request is routed
          the same way (its tokens repeat across runs). CUDA-graph replays set and advance the counter too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from e1.knobs import AXES

MODES = AXES["moe_routing"].allowed
BUSIEST = 8  # the share of routed slots that the busiest 8 experts of a layer receive


class _Balance:
    """Forward hook on one router: replaces its top-k expert ids by the balanced assignment (module doc)."""

    def __init__(self, n_experts: int, device: torch.device):
        self.n_experts = n_experts
        self.offset = torch.zeros((), dtype=torch.long, device=device)

    def __call__(self, _module: nn.Module, _args: Any, out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        *rest, index = out  # router returns (logits, top-k weights, top-k expert ids (T, k))
        slots = torch.arange(index.numel(), device=index.device)
        if index.shape[0] > 1:  # a prefill: the request starts at expert 0
            self.offset.zero_()
        balanced = ((slots + self.offset) % self.n_experts).view_as(index).to(index.dtype)
        self.offset.add_(index.numel()).remainder_(self.n_experts)
        return (*rest, balanced)


def routers(model: nn.Module) -> list[nn.Module]:
    """The router of every MoE layer of `model`'s LLM (none in a dense LLM)."""
    return [layer.mlp.gate for layer in model.llm.layers if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")]


def set_routing(model: nn.Module, mode: str) -> None:
    """Apply the routing mode to every MoE layer of `model` (learned: nothing to do)."""
    if mode not in MODES:
        raise ValueError(f"moe_routing {mode!r}; allowed: {', '.join(MODES)}")
    if mode == "balanced":
        device = next(model.parameters()).device
        for gate in routers(model):
            gate.register_forward_hook(_Balance(model.arch.llm["num_experts"], device))


def balance_counters(model: nn.Module) -> list[torch.Tensor]:
    """The balanced-routing counters of `model`'s routers (none under learned routing): code that interleaves
    two requests on one model (the cuda_graph guard) keeps a copy per request."""
    return [hook.offset for gate in routers(model) for hook in gate._forward_hooks.values()
            if isinstance(hook, _Balance)]


def load_stats(counts: list[list[int]], top_k: int) -> dict[str, Any]:
    """Per layer: tokens per expert, max/mean, the busiest 8 experts' share, experts hit; and over layers."""
    layers = []
    for c in counts:
        total, n = sum(c), len(c)
        mean = total / n
        layers.append({"max_over_mean": max(c) / mean if total else None,
                       f"busiest{BUSIEST}_share": sum(sorted(c)[-BUSIEST:]) / total if total else None,
                       "experts_hit": sum(1 for x in c if x)})
    def over(key: str) -> dict[str, float] | None:
        vals = [layer[key] for layer in layers if layer[key] is not None]
        return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)} if vals else None

    return {
        "tokens": sum(counts[0]) // top_k if counts else 0,
        "slots_per_layer": sum(counts[0]) if counts else 0,
        "max_over_mean": over("max_over_mean"),
        f"busiest{BUSIEST}_share": over(f"busiest{BUSIEST}_share"),
        "experts_hit": over("experts_hit"),
        "per_layer": layers,
        "counts": counts,
    }


@torch.inference_mode()
def expert_load(model: nn.Module, inp: Any, n_new: int) -> dict[str, Any]:
    """One untimed eager request of `n_new` tokens on `inp` (StageInputs): tokens each expert receives per
    layer, in prefill and summed over the n_new - 1 decode steps (greedy, EOS ignored, as in the timed runs).
    A dense LLM has no experts: {"prefill": None, "decode": None}."""
    gates = routers(model)
    if not gates:
        return {"mode_note": "dense LLM: no experts", "prefill": None, "decode": None}
    n_experts, top_k = model.arch.llm["num_experts"], model.arch.llm["top_k"]
    layers = len(gates)
    device = next(model.parameters()).device
    phase = {"prefill": torch.zeros(layers, n_experts, dtype=torch.long, device=device),
             "decode": torch.zeros(layers, n_experts, dtype=torch.long, device=device)}
    current = ["prefill"]

    def counter(k: int):
        def hook(_module, _args, out):  # sees the ids the experts run (after a balanced hook, if any)
            phase[current[0]][k] += torch.bincount(out[-1].reshape(-1), minlength=n_experts)
        return hook

    handles = [gate.register_forward_hook(counter(k)) for k, gate in enumerate(gates)]
    try:
        logits, cache = model.stage_prefill(inp, model.stage_projector(model.stage_vision(inp), inp))
        current[0] = "decode"
        with model.decode_experts():
            for _ in range(n_new - 1):
                logits, cache = model.decode_step(logits.argmax(-1, keepdim=True), cache)
    finally:
        for h in handles:
            h.remove()
    out = {"mode_note": "from one untimed eager request of the job's own inputs (hooks on the routers)",
           "prefill": load_stats(phase["prefill"].tolist(), top_k)}
    out["decode"] = load_stats(phase["decode"].tolist(), top_k) if n_new > 1 else None
    return out
